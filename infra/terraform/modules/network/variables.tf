variable "name" {
  description = "Prefix of every resource's Name tag (e.g. shipyard-prod)."
  type        = string
}

variable "cluster_name" {
  description = "Name of the EKS cluster that uses the subnets; tagged on them so its load balancers find them."
  type        = string
}

variable "cidr_block" {
  description = "The VPC's IPv4 range; a /16 leaves room for three /19 private subnets of pods and nodes."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = try(can(cidrnetmask(var.cidr_block)) && tonumber(split("/", var.cidr_block)[1]) <= 18, false)
    error_message = "cidr_block must be an IPv4 CIDR of /18 or larger (e.g. 10.40.0.0/16)."
  }
}

variable "availability_zones" {
  description = "Availability zones to spread the subnets over (two to four, e.g. [\"eu-west-1a\", \"eu-west-1b\", \"eu-west-1c\"])."
  type        = list(string)

  validation {
    condition     = length(var.availability_zones) >= 2 && length(var.availability_zones) <= 4
    error_message = "availability_zones must name two to four zones (EKS and RDS need at least two)."
  }
}

variable "nat_gateway_per_zone" {
  description = "One NAT gateway per zone (survives a zone outage) instead of one shared gateway (cheaper)."
  type        = bool
  default     = false
}

variable "flow_log_retention_days" {
  description = "Days the VPC flow logs are kept in CloudWatch Logs."
  type        = number
  default     = 365
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
