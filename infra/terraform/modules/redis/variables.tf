variable "name" {
  description = "ID of the ElastiCache replication group, and the prefix of its subnet group and security group."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,39}$", var.name))
    error_message = "name must be 1 to 40 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "vpc_id" {
  description = "VPC of the replication group's security group."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets, in at least two zones, the nodes may be placed in."
  type        = list(string)
}

variable "allowed_security_group_ids" {
  description = "Security groups whose members may connect on the Redis port (the EKS cluster's)."
  type        = list(string)
}

variable "engine_version" {
  description = "Redis OSS engine version."
  type        = string
  default     = "7.1"
}

variable "node_type" {
  description = "ElastiCache node type."
  type        = string
  default     = "cache.m7g.large"
}

variable "replicas" {
  description = "Read replicas besides the primary; at least one, so a failed primary fails over."
  type        = number
  default     = 1

  validation {
    condition     = var.replicas >= 1 && var.replicas <= 5
    error_message = "replicas must be between 1 and 5."
  }
}

variable "auth_token" {
  description = "Password clients send with AUTH (16 to 128 printable characters without @, \" or /; the environment generates one)."
  type        = string
  sensitive   = true

  validation {
    condition     = length(var.auth_token) >= 16 && length(var.auth_token) <= 128 && !can(regex("[@\"/]", var.auth_token))
    error_message = "auth_token must be 16 to 128 characters without @, \" or /."
  }
}

variable "snapshot_retention_days" {
  description = "Days daily snapshots are kept (Redis holds only messages the database can rebuild, so a few)."
  type        = number
  default     = 3
}

variable "log_retention_days" {
  description = "Days the slow and engine logs are kept in CloudWatch Logs."
  type        = number
  default     = 365
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
