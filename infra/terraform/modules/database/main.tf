# The platform database (jobs, promotions, audit, prediction log) on RDS PostgreSQL: private (no public
# address, reachable only from the cluster's security group), encrypted with its own key, TLS enforced,
# Multi-AZ, daily backups with point-in-time recovery, and a final snapshot on deletion.

module "key" {
  source = "../kms"

  name        = "${var.name}-rds"
  description = "Storage, snapshots and Performance Insights of RDS instance ${var.name}"
  tags        = var.tags
}

module "logs_key" {
  source = "../kms"

  name                = "${var.name}-rds-logs"
  description         = "Logs of RDS instance ${var.name}"
  for_cloudwatch_logs = true
  tags                = var.tags
}

# The log groups RDS exports to, created first so that they are encrypted and expire.
resource "aws_cloudwatch_log_group" "this" {
  for_each = toset(local.log_exports)

  name              = "/aws/rds/instance/${var.name}/${each.value}"
  retention_in_days = var.log_retention_days
  kms_key_id        = module.logs_key.key_arn
  tags              = var.tags
}

locals {
  log_exports = ["postgresql", "upgrade"]
}

resource "aws_db_subnet_group" "this" {
  name       = var.name
  subnet_ids = var.subnet_ids
  tags       = var.tags
}

resource "aws_security_group" "this" {
  name        = "${var.name}-postgresql"
  description = "PostgreSQL ${var.name}: connections from the cluster only"
  vpc_id      = var.vpc_id
  tags        = var.tags
}

resource "aws_vpc_security_group_ingress_rule" "postgresql" {
  # count, not for_each: the cluster's security group ID is unknown until the cluster exists.
  count = length(var.allowed_security_group_ids)

  security_group_id            = aws_security_group.this.id
  description                  = "PostgreSQL from ${var.allowed_security_group_ids[count.index]}"
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
  referenced_security_group_id = var.allowed_security_group_ids[count.index]
}

resource "aws_db_parameter_group" "this" {
  name_prefix = "${var.name}-"
  family      = "postgres${split(".", var.engine_version)[0]}"
  tags        = var.tags

  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }

  parameter {
    name  = "log_min_duration_statement"
    value = "1000" # statements slower than a second
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_db_instance" "this" {
  identifier                            = var.name
  engine                                = "postgres"
  engine_version                        = var.engine_version
  instance_class                        = var.instance_class
  allocated_storage                     = var.allocated_storage_gib
  max_allocated_storage                 = var.max_allocated_storage_gib
  storage_type                          = "gp3"
  storage_encrypted                     = true
  kms_key_id                            = module.key.key_arn
  db_name                               = var.database_name
  username                              = var.username
  password                              = var.password
  db_subnet_group_name                  = aws_db_subnet_group.this.name
  vpc_security_group_ids                = [aws_security_group.this.id]
  parameter_group_name                  = aws_db_parameter_group.this.name
  publicly_accessible                   = false
  multi_az                              = var.multi_az
  backup_retention_period               = var.backup_retention_days
  copy_tags_to_snapshot                 = true
  deletion_protection                   = var.deletion_protection
  skip_final_snapshot                   = false
  final_snapshot_identifier             = "${var.name}-final"
  auto_minor_version_upgrade            = true
  iam_database_authentication_enabled   = true
  enabled_cloudwatch_logs_exports       = local.log_exports
  performance_insights_enabled          = true
  performance_insights_kms_key_id       = module.key.key_arn
  performance_insights_retention_period = 7
  monitoring_interval                   = 30
  monitoring_role_arn                   = aws_iam_role.monitoring.arn
  tags                                  = var.tags

  depends_on = [aws_cloudwatch_log_group.this]
}

data "aws_partition" "current" {}

data "aws_iam_policy_document" "monitoring_trust" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["monitoring.rds.amazonaws.com"]
    }
  }
}

# Enhanced monitoring (OS metrics every 30 s) publishes through this role.
resource "aws_iam_role" "monitoring" {
  name               = "${var.name}-rds-monitoring"
  assume_role_policy = data.aws_iam_policy_document.monitoring_trust.json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "monitoring" {
  role       = aws_iam_role.monitoring.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}
