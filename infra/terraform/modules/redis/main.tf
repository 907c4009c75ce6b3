# The platform's broker and event bus (Celery, registry events) on ElastiCache for Redis: a primary
# and replicas in different zones with automatic failover, encrypted at rest with its own key and in
# transit (TLS, so clients use rediss://), an AUTH token, reachable only from the cluster.

module "key" {
  source = "../kms"

  name        = "${var.name}-elasticache"
  description = "Data and snapshots of ElastiCache replication group ${var.name}"
  tags        = var.tags
}

module "logs_key" {
  source = "../kms"

  name                = "${var.name}-elasticache-logs"
  description         = "Logs of ElastiCache replication group ${var.name}"
  for_cloudwatch_logs = true
  tags                = var.tags
}

resource "aws_elasticache_subnet_group" "this" {
  name       = var.name
  subnet_ids = var.subnet_ids
  tags       = var.tags
}

resource "aws_security_group" "this" {
  name        = "${var.name}-redis"
  description = "Redis ${var.name}: connections from the cluster only"
  vpc_id      = var.vpc_id
  tags        = var.tags
}

resource "aws_vpc_security_group_ingress_rule" "redis" {
  # count, not for_each: the cluster's security group ID is unknown until the cluster exists.
  count = length(var.allowed_security_group_ids)

  security_group_id            = aws_security_group.this.id
  description                  = "Redis from ${var.allowed_security_group_ids[count.index]}"
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
  referenced_security_group_id = var.allowed_security_group_ids[count.index]
}

resource "aws_cloudwatch_log_group" "this" {
  for_each = toset(["slow-log", "engine-log"])

  name              = "/shipyard/${var.name}/elasticache/${each.value}"
  retention_in_days = var.log_retention_days
  kms_key_id        = module.logs_key.key_arn
  tags              = var.tags
}

resource "aws_elasticache_replication_group" "this" {
  replication_group_id       = var.name
  description                = "Shipyard broker and events (${var.name})"
  engine                     = "redis"
  engine_version             = var.engine_version
  node_type                  = var.node_type
  port                       = 6379
  num_cache_clusters         = var.replicas + 1
  automatic_failover_enabled = true
  multi_az_enabled           = true
  subnet_group_name          = aws_elasticache_subnet_group.this.name
  security_group_ids         = [aws_security_group.this.id]
  at_rest_encryption_enabled = true
  kms_key_id                 = module.key.key_arn
  transit_encryption_enabled = true
  auth_token                 = var.auth_token
  auto_minor_version_upgrade = true
  snapshot_retention_limit   = var.snapshot_retention_days
  apply_immediately          = false
  tags                       = var.tags

  dynamic "log_delivery_configuration" {
    for_each = aws_cloudwatch_log_group.this
    content {
      destination      = log_delivery_configuration.value.name
      destination_type = "cloudwatch-logs"
      log_format       = "json"
      log_type         = log_delivery_configuration.key
    }
  }
}
