variable "region" {
  description = "AWS region of the whole environment (e.g. eu-west-1)."
  type        = string
}

variable "availability_zones" {
  description = "Two to four availability zones of the region for the subnets, the nodes, RDS and ElastiCache."
  type        = list(string)
}

variable "name" {
  description = "Name of the environment: the EKS cluster, the prefix of every resource, the Helm release's namespace suffix."
  type        = string
  default     = "shipyard"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}$", var.name))
    error_message = "name must be 2 to 31 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "tags" {
  description = "Tags added to every AWS resource (besides shipyard.io/environment)."
  type        = map(string)
  default     = {}
}

variable "vpc_cidr_block" {
  description = "The VPC's IPv4 range."
  type        = string
  default     = "10.40.0.0/16"
}

variable "kubernetes_version" {
  description = "Kubernetes minor version of the EKS cluster."
  type        = string
  default     = "1.32"
}

variable "cluster_admin_arns" {
  description = "IAM roles or users given cluster-admin, besides the identity that runs Terraform."
  type        = list(string)
  default     = []
}

variable "endpoint_public_access" {
  description = "Whether the Kubernetes API is reachable from public_access_cidrs over the internet (else only inside the VPC)."
  type        = bool
  default     = false
}

variable "public_access_cidrs" {
  description = "IPv4 ranges allowed to reach a public Kubernetes API endpoint."
  type        = list(string)
  default     = []
}

variable "cpu_instance_types" {
  description = "Instance types of the CPU node group."
  type        = list(string)
  default     = ["m6i.xlarge"]
}

variable "gpu_instance_types" {
  description = "Instance types of the GPU node group (each with gpus_per_node NVIDIA GPUs)."
  type        = list(string)
  default     = ["g5.xlarge"]
}

variable "gpus_per_node" {
  description = "NVIDIA GPUs on each GPU node."
  type        = number
  default     = 1
}

variable "gpu_max_nodes" {
  description = "Most GPU nodes; the group scales from zero, and the chart's GPU scaler runs at most one worker per node."
  type        = number
  default     = 2
}

variable "bucket_name" {
  description = "Globally unique name of the artifact bucket (MLflow artifacts and the DVC remote)."
  type        = string
}

variable "database_instance_class" {
  description = "RDS instance class of the platform database."
  type        = string
  default     = "db.m6g.large"
}

variable "redis_node_type" {
  description = "ElastiCache node type of the broker."
  type        = string
  default     = "cache.m7g.large"
}

variable "namespace" {
  description = "Kubernetes namespace of the Shipyard release."
  type        = string
  default     = "shipyard"
}

variable "image_repository" {
  description = "Repository of the shipyard image (services, CPU workers), e.g. an ECR repository URI."
  type        = string
}

variable "gpu_image_repository" {
  description = "Repository of the shipyard-gpu image (GPU workers)."
  type        = string
}

variable "image_tag" {
  description = "Tag of both images; empty means the chart's appVersion."
  type        = string
  default     = ""
}

variable "postgres_client_image" {
  description = "Image whose psql creates MLflow's two databases on the RDS instance (a one-off Job)."
  type        = string
  default     = "postgres:17.6"
}

variable "cluster_autoscaler_chart_version" {
  description = "Version of the cluster-autoscaler chart (kubernetes.github.io/autoscaler) matching kubernetes_version (9.46.x is Cluster Autoscaler 1.32)."
  type        = string
  default     = "9.46.6"
}

variable "nvidia_device_plugin_chart_version" {
  description = "Version of NVIDIA's device plugin chart, which advertises nvidia.com/gpu on the GPU nodes."
  type        = string
  default     = "0.17.1"
}
