variable "name" {
  description = "Name of the EKS cluster, and the prefix of its IAM roles, keys and node groups."
  type        = string
}

variable "kubernetes_version" {
  description = "Kubernetes minor version of the control plane and the nodes (e.g. 1.32)."
  type        = string
  default     = "1.32"
}

variable "subnet_ids" {
  description = "Private subnets, in at least two zones, for the control plane's interfaces and the nodes."
  type        = list(string)
}

variable "endpoint_public_access" {
  description = "Whether the API server is reachable from the internet (only from public_access_cidrs); false keeps it inside the VPC."
  type        = bool
  default     = false
}

variable "public_access_cidrs" {
  description = "IPv4 ranges allowed to reach a public API endpoint (an office or a VPN's egress); never 0.0.0.0/0."
  type        = list(string)
  default     = []

  validation {
    condition     = !contains(var.public_access_cidrs, "0.0.0.0/0")
    error_message = "public_access_cidrs must not contain 0.0.0.0/0: name the ranges that administer the cluster."
  }
}

variable "admin_principal_arns" {
  description = "IAM roles or users given cluster-admin through EKS access entries, besides the identity that creates the cluster."
  type        = list(string)
  default     = []
}

variable "cpu_instance_types" {
  description = "Instance types of the CPU node group (services, CPU training workers)."
  type        = list(string)
  default     = ["m6i.xlarge"]
}

variable "cpu_min_size" {
  description = "Fewest CPU nodes."
  type        = number
  default     = 2
}

variable "cpu_max_size" {
  description = "Most CPU nodes the cluster autoscaler may start."
  type        = number
  default     = 6
}

variable "gpu_instance_types" {
  description = "Instance types of the GPU node group; all must carry gpu_count_per_node NVIDIA GPUs."
  type        = list(string)
  default     = ["g5.xlarge"]
}

variable "gpu_count_per_node" {
  description = "NVIDIA GPUs on each GPU node, advertised to the cluster autoscaler so it can scale the group up from zero."
  type        = number
  default     = 1
}

variable "gpu_max_size" {
  description = "Most GPU nodes; the group starts at zero and the cluster autoscaler adds nodes while GPU pods wait."
  type        = number
  default     = 2

  validation {
    condition     = var.gpu_max_size >= 1
    error_message = "gpu_max_size must be at least 1, or GPU jobs never find a node."
  }
}

variable "gpu_node_labels" {
  description = "Kubernetes labels of the GPU nodes, which GPU workers select on (the chart's gpuWorker.nodeSelector)."
  type        = map(string)
  default = {
    "shipyard.io/node-pool"  = "gpu"
    "nvidia.com/gpu.present" = "true"
  }
}

variable "node_disk_size_gib" {
  description = "Size of each node's encrypted root volume in GiB (images with CUDA are large)."
  type        = number
  default     = 100
}

variable "addon_versions" {
  description = "Exact versions of the EKS add-ons by name (vpc-cni, kube-proxy, coredns, aws-ebs-csi-driver); an add-on left out gets EKS's default for kubernetes_version when it is created."
  type        = map(string)
  default     = {}
}

variable "log_retention_days" {
  description = "Days the control plane's logs are kept in CloudWatch Logs."
  type        = number
  default     = 365
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
