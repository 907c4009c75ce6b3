variable "name" {
  description = "Identifier of the RDS instance, and the prefix of its subnet group, parameter group and security group."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,50}[a-z0-9]$", var.name))
    error_message = "name must be 2 to 52 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "vpc_id" {
  description = "VPC of the instance's security group."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets, in at least two zones, the instance may be placed in."
  type        = list(string)
}

variable "allowed_security_group_ids" {
  description = "Security groups whose members may connect on the PostgreSQL port (the EKS cluster's)."
  type        = list(string)
}

variable "engine_version" {
  description = "PostgreSQL version (major.minor); minor upgrades are applied in the maintenance window."
  type        = string
  default     = "16.8"
}

variable "instance_class" {
  description = "RDS instance class."
  type        = string
  default     = "db.m6g.large"
}

variable "allocated_storage_gib" {
  description = "Initial storage in GiB."
  type        = number
  default     = 50
}

variable "max_allocated_storage_gib" {
  description = "Storage autoscaling ceiling in GiB."
  type        = number
  default     = 500
}

variable "multi_az" {
  description = "Whether a standby in a second zone takes over on failure."
  type        = bool
  default     = true
}

variable "database_name" {
  description = "Name of the platform's database."
  type        = string
  default     = "shipyard"
}

variable "username" {
  description = "Master user name."
  type        = string
  default     = "shipyard"
}

variable "password" {
  description = "Master user password (16 or more characters; the environment generates one)."
  type        = string
  sensitive   = true

  validation {
    condition     = length(var.password) >= 16
    error_message = "password must be at least 16 characters."
  }
}

variable "backup_retention_days" {
  description = "Days automated backups (point-in-time recovery) are kept."
  type        = number
  default     = 14

  validation {
    condition     = var.backup_retention_days >= 7 && var.backup_retention_days <= 35
    error_message = "backup_retention_days must be between 7 and 35."
  }
}

variable "deletion_protection" {
  description = "Whether the instance refuses to be deleted (turn off deliberately before a destroy)."
  type        = bool
  default     = true
}

variable "log_retention_days" {
  description = "Days the PostgreSQL and upgrade logs are kept in CloudWatch Logs."
  type        = number
  default     = 365
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
