variable "bucket_name" {
  description = "Globally unique name of the artifact bucket (MLflow artifacts under mlflow/, the DVC remote under dvc/); its access logs go to <name>-logs."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{1,56}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be 3 to 58 lowercase letters, digits or hyphens (no dots: they break TLS to the bucket, and <name>-logs must fit in 63)."
  }
}

variable "noncurrent_version_days" {
  description = "Days an overwritten or deleted object's previous version is kept (what a bad push can be undone within)."
  type        = number
  default     = 90
}

variable "access_log_days" {
  description = "Days the bucket's server access logs are kept."
  type        = number
  default     = 365
}

variable "force_destroy" {
  description = "Whether terraform destroy may delete a bucket that still holds objects; false protects models and datasets."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
