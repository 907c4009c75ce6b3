# Two managed node groups. CPU nodes run the services and CPU training; GPU nodes carry the NVIDIA
# taint, so only pods that tolerate it (GPU workers) land there, and the group starts at zero: the
# cluster autoscaler reads the ASG's node-template tags below to know that a new node would have the
# GPU labels, taint and nvidia.com/gpu resource, and scales up from zero when a GPU pod is pending.

locals {
  cpu_labels = { "shipyard.io/node-pool" = "cpu" }
  gpu_taint  = { key = "nvidia.com/gpu", value = "true", effect = "NoSchedule" }
  gpu_template_tags = merge(
    { for key, value in var.gpu_node_labels : "k8s.io/cluster-autoscaler/node-template/label/${key}" => value },
    {
      "k8s.io/cluster-autoscaler/node-template/taint/${local.gpu_taint.key}" = "${local.gpu_taint.value}:${local.gpu_taint.effect}"
      "k8s.io/cluster-autoscaler/node-template/resources/nvidia.com/gpu"     = tostring(var.gpu_count_per_node)
    },
  )
}

resource "aws_launch_template" "node" {
  for_each = toset(["cpu", "gpu"])

  name_prefix            = "${var.name}-${each.key}-"
  update_default_version = true
  tags                   = var.tags

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_size           = var.node_disk_size_gib
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(var.tags, { Name = "${var.name}-${each.key}" })
  }
}

resource "aws_eks_node_group" "cpu" {
  cluster_name           = aws_eks_cluster.this.name
  node_group_name_prefix = "${var.name}-cpu-"
  node_role_arn          = aws_iam_role.node.arn
  subnet_ids             = var.subnet_ids
  ami_type               = "AL2023_x86_64_STANDARD"
  instance_types         = var.cpu_instance_types
  labels                 = local.cpu_labels
  tags                   = var.tags

  launch_template {
    id      = aws_launch_template.node["cpu"].id
    version = aws_launch_template.node["cpu"].latest_version
  }

  scaling_config {
    min_size     = var.cpu_min_size
    max_size     = var.cpu_max_size
    desired_size = var.cpu_min_size
  }

  lifecycle {
    create_before_destroy = true
    ignore_changes        = [scaling_config[0].desired_size] # the cluster autoscaler's to set
  }

  depends_on = [aws_iam_role_policy_attachment.node]
}

resource "aws_eks_node_group" "gpu" {
  cluster_name           = aws_eks_cluster.this.name
  node_group_name_prefix = "${var.name}-gpu-"
  node_role_arn          = aws_iam_role.node.arn
  subnet_ids             = var.subnet_ids
  ami_type               = "AL2023_x86_64_NVIDIA"
  instance_types         = var.gpu_instance_types
  labels                 = var.gpu_node_labels
  tags                   = merge(var.tags, local.gpu_template_tags)

  launch_template {
    id      = aws_launch_template.node["gpu"].id
    version = aws_launch_template.node["gpu"].latest_version
  }

  taint {
    key    = local.gpu_taint.key
    value  = local.gpu_taint.value
    effect = "NO_SCHEDULE"
  }

  scaling_config {
    min_size     = 0
    max_size     = var.gpu_max_size
    desired_size = 0
  }

  lifecycle {
    create_before_destroy = true
    ignore_changes        = [scaling_config[0].desired_size]
  }

  depends_on = [aws_iam_role_policy_attachment.node]
}

# Managed node groups do not copy their tags to their Auto Scaling group, where the autoscaler reads them.
resource "aws_autoscaling_group_tag" "gpu_template" {
  for_each = local.gpu_template_tags

  autoscaling_group_name = aws_eks_node_group.gpu.resources[0].autoscaling_groups[0].name

  tag {
    key                 = each.key
    value               = each.value
    propagate_at_launch = false
  }
}
