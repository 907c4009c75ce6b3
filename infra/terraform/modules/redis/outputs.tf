output "primary_endpoint" {
  description = "Host name of the primary (it moves to a replica on failover)."
  value       = aws_elasticache_replication_group.this.primary_endpoint_address
}

output "port" {
  description = "Redis port (TLS)."
  value       = aws_elasticache_replication_group.this.port
}

output "security_group_id" {
  description = "Security group of the replication group."
  value       = aws_security_group.this.id
}
