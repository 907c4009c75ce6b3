# `terraform test` with a mocked AWS provider: Redis is encrypted both ways, authenticated and replicated.

mock_provider "aws" {
  source = "./mocks"
}

variables {
  name                       = "shipyard-test"
  vpc_id                     = "vpc-aaaa"
  subnet_ids                 = ["subnet-aaaa", "subnet-bbbb"]
  allowed_security_group_ids = ["sg-cluster"]
  auth_token                 = "a-token-of-32-characters-long-ok"
}

run "encrypted_authenticated_and_replicated" {
  command = plan

  module {
    source = "../modules/redis"
  }

  assert {
    condition     = aws_elasticache_replication_group.this.at_rest_encryption_enabled == "true" && aws_elasticache_replication_group.this.transit_encryption_enabled
    error_message = "Redis must be encrypted at rest and in transit"
  }

  assert {
    condition     = aws_elasticache_replication_group.this.num_cache_clusters == 2 && aws_elasticache_replication_group.this.automatic_failover_enabled
    error_message = "a primary and a replica with automatic failover"
  }

  assert {
    condition     = length(aws_vpc_security_group_ingress_rule.redis) == 1 && aws_vpc_security_group_ingress_rule.redis[0].referenced_security_group_id == "sg-cluster"
    error_message = "only the cluster's security group reaches Redis"
  }
}

run "a_token_with_a_slash_is_refused" {
  command = plan

  module {
    source = "../modules/redis"
  }

  variables {
    auth_token = "a-token-of-32-characters/long-ok"
  }

  expect_failures = [var.auth_token]
}
