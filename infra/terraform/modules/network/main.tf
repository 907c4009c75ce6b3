# A VPC with a private subnet per zone (nodes, pods, databases: no public address) and a small public
# subnet per zone (NAT gateways and internet-facing load balancers). The default security group denies
# everything, and flow logs go to an encrypted log group.

locals {
  zones = { for index, zone in var.availability_zones : zone => index }
  # The private subnets are the first /19s of a /16 (/(n+3) in general), the public ones /24s at its end.
  private_cidrs = { for zone, index in local.zones : zone => cidrsubnet(var.cidr_block, 3, index) }
  public_cidrs  = { for zone, index in local.zones : zone => cidrsubnet(var.cidr_block, 8, 240 + index) }
  nat_zones     = var.nat_gateway_per_zone ? var.availability_zones : [var.availability_zones[0]]
  cluster_tag   = { "kubernetes.io/cluster/${var.cluster_name}" = "shared" }
}

resource "aws_vpc" "this" {
  cidr_block           = var.cidr_block
  enable_dns_support   = true
  enable_dns_hostnames = true
  tags                 = merge(var.tags, { Name = var.name })
}

resource "aws_default_security_group" "this" {
  vpc_id = aws_vpc.this.id
  tags   = merge(var.tags, { Name = "${var.name}-default-deny" })
}

resource "aws_subnet" "private" {
  for_each = local.private_cidrs

  vpc_id            = aws_vpc.this.id
  availability_zone = each.key
  cidr_block        = each.value
  tags = merge(var.tags, local.cluster_tag, {
    Name                              = "${var.name}-private-${each.key}"
    "kubernetes.io/role/internal-elb" = "1"
  })
}

resource "aws_subnet" "public" {
  for_each = local.public_cidrs

  vpc_id                  = aws_vpc.this.id
  availability_zone       = each.key
  cidr_block              = each.value
  map_public_ip_on_launch = false
  tags = merge(var.tags, local.cluster_tag, {
    Name                     = "${var.name}-public-${each.key}"
    "kubernetes.io/role/elb" = "1"
  })
}

resource "aws_internet_gateway" "this" {
  vpc_id = aws_vpc.this.id
  tags   = merge(var.tags, { Name = var.name })
}

resource "aws_eip" "nat" {
  #checkov:skip=CKV2_AWS_19:the address belongs to a NAT gateway, not an instance
  for_each = toset(local.nat_zones)

  domain = "vpc"
  tags   = merge(var.tags, { Name = "${var.name}-nat-${each.key}" })
}

resource "aws_nat_gateway" "this" {
  for_each = toset(local.nat_zones)

  allocation_id = aws_eip.nat[each.key].id
  subnet_id     = aws_subnet.public[each.key].id
  tags          = merge(var.tags, { Name = "${var.name}-${each.key}" })

  depends_on = [aws_internet_gateway.this]
}
