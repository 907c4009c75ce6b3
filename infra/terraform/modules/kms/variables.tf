variable "name" {
  description = "Alias of the key, without the alias/ prefix (e.g. shipyard-prod-database)."
  type        = string
}

variable "description" {
  description = "What the key encrypts, shown in the KMS console."
  type        = string
}

variable "for_cloudwatch_logs" {
  description = "Whether CloudWatch Logs log groups of this account and region encrypt with the key (Logs uses a key on its own behalf, so the key policy must name it)."
  type        = bool
  default     = false
}

variable "deletion_window_in_days" {
  description = "Days a deleted key waits before it is gone (7 to 30); data it encrypted is unreadable after that."
  type        = number
  default     = 30

  validation {
    condition     = var.deletion_window_in_days >= 7 && var.deletion_window_in_days <= 30
    error_message = "deletion_window_in_days must be between 7 and 30."
  }
}

variable "tags" {
  description = "Tags added to the key."
  type        = map(string)
  default     = {}
}
