# `terraform test` with a mocked AWS provider: the network module's subnets, gateways and defaults.

mock_provider "aws" {
  source = "./mocks"
}

variables {
  name               = "shipyard-test"
  cluster_name       = "shipyard-test"
  availability_zones = ["eu-west-1a", "eu-west-1b", "eu-west-1c"]
}

run "subnets_per_zone_without_overlap_and_one_nat_gateway" {
  command = plan

  module {
    source = "../modules/network"
  }

  assert {
    condition     = length(aws_subnet.private) == 3 && length(aws_subnet.public) == 3
    error_message = "one private and one public subnet per zone"
  }

  assert {
    condition     = length(distinct(concat([for s in aws_subnet.private : s.cidr_block], [for s in aws_subnet.public : s.cidr_block]))) == 6
    error_message = "the subnets' ranges must differ"
  }

  assert {
    condition     = alltrue([for s in aws_subnet.public : s.map_public_ip_on_launch == false])
    error_message = "nothing gets a public address by default"
  }

  assert {
    condition     = alltrue([for s in aws_subnet.private : s.tags["kubernetes.io/role/internal-elb"] == "1" && s.tags["kubernetes.io/cluster/shipyard-test"] == "shared"])
    error_message = "private subnets must be tagged for EKS's internal load balancers"
  }

  assert {
    condition     = length(aws_nat_gateway.this) == 1 && length(aws_route.private_nat) == 3
    error_message = "one shared NAT gateway by default, routed from every private subnet"
  }
}

run "a_nat_gateway_per_zone" {
  command = plan

  module {
    source = "../modules/network"
  }

  variables {
    nat_gateway_per_zone = true
  }

  assert {
    condition     = length(aws_nat_gateway.this) == 3
    error_message = "a NAT gateway per zone"
  }
}

run "a_single_zone_is_refused" {
  command = plan

  module {
    source = "../modules/network"
  }

  variables {
    availability_zones = ["eu-west-1a"]
  }

  expect_failures = [var.availability_zones]
}
