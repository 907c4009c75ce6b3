variable "name" {
  description = "Name of the IAM role."
  type        = string
}

variable "oidc_provider_arn" {
  description = "ARN of the cluster's IAM OIDC provider (the cluster module's oidc_provider_arn)."
  type        = string
}

variable "oidc_issuer" {
  description = "The cluster's OIDC issuer without https:// (the cluster module's oidc_issuer)."
  type        = string
}

variable "service_accounts" {
  description = "Kubernetes service accounts that may assume the role, each as namespace:name."
  type        = list(string)

  validation {
    condition     = length(var.service_accounts) > 0 && alltrue([for sa in var.service_accounts : can(regex("^[a-z0-9-]+:[a-z0-9.-]+$", sa))])
    error_message = "service_accounts must list at least one service account, each as namespace:name."
  }
}

variable "policy_json" {
  description = "The role's inline policy, a JSON IAM policy document; null for none."
  type        = string
  default     = null
}

variable "policy_arns" {
  description = "ARNs of managed policies attached to the role (e.g. AWS's AmazonEBSCSIDriverPolicy)."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags added to the role."
  type        = map(string)
  default     = {}
}
