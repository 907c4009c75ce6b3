# EKS-managed add-ons (networking, DNS, EBS volumes for persistent volume claims) and the IAM roles of
# the two controllers that call AWS: the EBS CSI driver and the cluster autoscaler (installed by the
# environment with Helm, in kube-system, service account cluster-autoscaler). The VPC CNI is asked to
# enforce NetworkPolicies, which it does not by default (the chart's policies would be ignored).

data "aws_caller_identity" "current" {}
data "aws_region" "current" {}

resource "aws_eks_addon" "this" {
  for_each = toset(["vpc-cni", "kube-proxy", "coredns", "aws-ebs-csi-driver"])

  cluster_name                = aws_eks_cluster.this.name
  addon_name                  = each.value
  addon_version               = lookup(var.addon_versions, each.value, null)
  service_account_role_arn    = each.value == "aws-ebs-csi-driver" ? module.ebs_csi_role.role_arn : null
  configuration_values        = each.value == "vpc-cni" ? jsonencode({ enableNetworkPolicy = "true" }) : null
  resolve_conflicts_on_create = "OVERWRITE"
  resolve_conflicts_on_update = "PRESERVE"
  tags                        = var.tags

  # coredns and the EBS controller are Deployments: they need nodes to become healthy.
  depends_on = [aws_eks_node_group.cpu]
}

module "ebs_csi_role" {
  source = "../irsa"

  name              = "${var.name}-ebs-csi"
  oidc_provider_arn = aws_iam_openid_connect_provider.this.arn
  oidc_issuer       = local.oidc_issuer
  service_accounts  = ["kube-system:ebs-csi-controller-sa"]
  policy_arns       = ["arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AmazonEBSCSIDriverPolicy"]
  tags              = var.tags
}

locals {
  oidc_issuer = replace(aws_eks_cluster.this.identity[0].oidc[0].issuer, "https://", "")
  nodegroups  = "arn:${data.aws_partition.current.partition}:eks:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:nodegroup/${var.name}/*/*"
}

data "aws_iam_policy_document" "autoscaler" {
  statement {
    sid = "Discover"
    actions = [
      "autoscaling:DescribeAutoScalingGroups",
      "autoscaling:DescribeAutoScalingInstances",
      "autoscaling:DescribeLaunchConfigurations",
      "autoscaling:DescribeScalingActivities",
      "autoscaling:DescribeTags",
      "ec2:DescribeImages",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeLaunchTemplateVersions",
      "ec2:GetInstanceTypesFromInstanceRequirements",
    ]
    resources = ["*"] # describe calls take no resource
  }

  statement {
    sid       = "ReadNodeGroups"
    actions   = ["eks:DescribeNodegroup"]
    resources = [local.nodegroups]
  }

  statement {
    sid       = "ScaleOwnGroups"
    actions   = ["autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup"]
    resources = ["*"]

    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/k8s.io/cluster-autoscaler/${var.name}"
      values   = ["owned"]
    }
  }
}

module "autoscaler_role" {
  source = "../irsa"

  name              = "${var.name}-cluster-autoscaler"
  oidc_provider_arn = aws_iam_openid_connect_provider.this.arn
  oidc_issuer       = local.oidc_issuer
  service_accounts  = ["kube-system:cluster-autoscaler"]
  policy_json       = data.aws_iam_policy_document.autoscaler.json
  tags              = var.tags
}
