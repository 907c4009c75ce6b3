# `terraform test` with a mocked AWS provider (no account, nothing created): what the plan of the
# cluster module promises about its node groups and its API endpoint.

mock_provider "aws" {
  source = "./mocks"
}

variables {
  name       = "shipyard-test"
  subnet_ids = ["subnet-aaaa", "subnet-bbbb"]
}

run "gpu_nodes_scale_from_zero_behind_the_nvidia_taint_and_the_api_is_private" {
  command = plan

  module {
    source = "../modules/cluster"
  }

  assert {
    condition     = aws_eks_node_group.gpu.scaling_config[0].min_size == 0 && aws_eks_node_group.gpu.scaling_config[0].desired_size == 0
    error_message = "the GPU node group must start at, and may go back to, zero nodes"
  }

  assert {
    condition     = one(aws_eks_node_group.gpu.taint).key == "nvidia.com/gpu" && one(aws_eks_node_group.gpu.taint).effect == "NO_SCHEDULE"
    error_message = "GPU nodes must carry the NVIDIA taint"
  }

  assert {
    condition     = aws_eks_node_group.gpu.labels == output.gpu_node_selector && aws_eks_node_group.gpu.ami_type == "AL2023_x86_64_NVIDIA"
    error_message = "the GPU nodes' labels must be the selector the chart is given, on the NVIDIA image"
  }

  assert {
    condition     = output.gpu_tolerations[0].key == "nvidia.com/gpu" && output.gpu_tolerations[0].effect == "NoSchedule"
    error_message = "the tolerations the chart is given must match the taint"
  }

  assert {
    condition     = aws_autoscaling_group_tag.gpu_template["k8s.io/cluster-autoscaler/node-template/resources/nvidia.com/gpu"].tag[0].value == "1"
    error_message = "the GPU group's ASG must advertise its nvidia.com/gpu for scale-up from zero"
  }

  assert {
    condition     = aws_autoscaling_group_tag.gpu_template["k8s.io/cluster-autoscaler/node-template/taint/nvidia.com/gpu"].tag[0].value == "true:NoSchedule"
    error_message = "the GPU group's ASG must advertise the taint"
  }

  assert {
    condition     = aws_autoscaling_group_tag.gpu_template["k8s.io/cluster-autoscaler/node-template/label/shipyard.io/node-pool"].tag[0].value == "gpu"
    error_message = "the GPU group's ASG must advertise the labels"
  }

  assert {
    condition     = jsondecode(aws_eks_addon.this["vpc-cni"].configuration_values).enableNetworkPolicy == "true"
    error_message = "the VPC CNI must enforce the chart's NetworkPolicies"
  }

  assert {
    condition     = aws_eks_cluster.this.vpc_config[0].endpoint_public_access == false && aws_eks_cluster.this.vpc_config[0].endpoint_private_access
    error_message = "the API endpoint must be private by default"
  }
}

run "an_open_public_endpoint_is_refused" {
  command = plan

  module {
    source = "../modules/cluster"
  }

  variables {
    endpoint_public_access = true
    public_access_cidrs    = ["0.0.0.0/0"]
  }

  expect_failures = [var.public_access_cidrs]
}
