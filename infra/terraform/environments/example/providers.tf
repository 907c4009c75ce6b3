provider "aws" {
  region = var.region

  default_tags {
    tags = merge(var.tags, { "shipyard.io/environment" = var.name })
  }
}

# Both Kubernetes providers reach the new cluster's API with a short-lived token from the AWS CLI, as
# the identity running Terraform (given cluster-admin when it creates the cluster). With a private API
# endpoint, run Terraform from inside the VPC (a VPN or a bastion).
locals {
  kube_exec = {
    api_version = "client.authentication.k8s.io/v1beta1"
    command     = "aws"
    args        = ["eks", "get-token", "--cluster-name", module.cluster.cluster_name, "--region", var.region]
  }
}

provider "kubernetes" {
  host                   = module.cluster.cluster_endpoint
  cluster_ca_certificate = base64decode(module.cluster.cluster_ca_certificate)

  exec {
    api_version = local.kube_exec.api_version
    command     = local.kube_exec.command
    args        = local.kube_exec.args
  }
}

provider "helm" {
  kubernetes {
    host                   = module.cluster.cluster_endpoint
    cluster_ca_certificate = base64decode(module.cluster.cluster_ca_certificate)

    exec {
      api_version = local.kube_exec.api_version
      command     = local.kube_exec.command
      args        = local.kube_exec.args
    }
  }
}
