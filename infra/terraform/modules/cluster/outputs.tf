output "cluster_name" {
  description = "Name of the EKS cluster."
  value       = aws_eks_cluster.this.name
}

output "cluster_endpoint" {
  description = "URL of the Kubernetes API server."
  value       = aws_eks_cluster.this.endpoint
}

output "cluster_ca_certificate" {
  description = "The API server's certificate authority, base64-encoded PEM."
  value       = aws_eks_cluster.this.certificate_authority[0].data
}

output "cluster_security_group_id" {
  description = "Security group EKS puts on the control plane and every managed node; databases allow it in."
  value       = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
}

output "oidc_provider_arn" {
  description = "ARN of the cluster's IAM OIDC provider, for IRSA roles."
  value       = aws_iam_openid_connect_provider.this.arn
}

output "oidc_issuer" {
  description = "The cluster's OIDC issuer without https://, for IRSA trust conditions."
  value       = local.oidc_issuer
}

output "autoscaler_role_arn" {
  description = "IAM role of the cluster autoscaler's service account (kube-system/cluster-autoscaler)."
  value       = module.autoscaler_role.role_arn
}

output "cpu_node_selector" {
  description = "Node selector that puts a pod on the CPU node group (controllers, one-off jobs)."
  value       = local.cpu_labels
}

output "gpu_node_selector" {
  description = "Node selector that puts a pod on the GPU node group (the chart's gpuWorker.nodeSelector)."
  value       = var.gpu_node_labels
}

output "gpu_tolerations" {
  description = "Tolerations that let a pod onto the tainted GPU nodes (the chart's gpuWorker.tolerations)."
  value       = [merge(local.gpu_taint, { operator = "Equal" })]
}
