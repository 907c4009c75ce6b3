output "cluster_name" {
  description = "Name of the EKS cluster."
  value       = module.cluster.cluster_name
}

output "kubeconfig_command" {
  description = "Command that adds the cluster to your kubeconfig."
  value       = "aws eks update-kubeconfig --region ${var.region} --name ${module.cluster.cluster_name}"
}

output "bucket_name" {
  description = "The artifact bucket (MLflow artifacts under mlflow/, the DVC remote under dvc/)."
  value       = module.storage.bucket_name
}

output "mlflow_artifact_root" {
  description = "Where MLflow stores artifacts."
  value       = module.storage.mlflow_artifact_root
}

output "database_address" {
  description = "Host name of the RDS instance (private)."
  value       = module.database.address
}

output "redis_primary_endpoint" {
  description = "Host name of the Redis primary (private, TLS)."
  value       = module.redis.primary_endpoint
}

output "platform_role_arn" {
  description = "IAM role of the Shipyard service account (bucket access)."
  value       = module.platform_role.role_arn
}

output "admin_token_command" {
  description = "Command that prints the admin token the chart generated (its Secret is named after the release, which says shipyard)."
  value       = "kubectl -n ${var.namespace} get secret ${helm_release.shipyard.name} -o jsonpath='{.data.admin-token}' | base64 -d"
}
