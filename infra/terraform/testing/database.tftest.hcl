# `terraform test` with a mocked AWS provider: the database is private, encrypted and backed up.

mock_provider "aws" {
  source = "./mocks"
}

variables {
  name                       = "shipyard-test"
  vpc_id                     = "vpc-aaaa"
  subnet_ids                 = ["subnet-aaaa", "subnet-bbbb"]
  allowed_security_group_ids = ["sg-cluster"]
  password                   = "a-password-of-32-characters-long"
}

run "private_encrypted_and_backed_up" {
  command = plan

  module {
    source = "../modules/database"
  }

  assert {
    condition     = aws_db_instance.this.publicly_accessible == false && aws_db_instance.this.storage_encrypted
    error_message = "the instance must be private and encrypted"
  }

  assert {
    condition     = aws_db_instance.this.backup_retention_period >= 7 && aws_db_instance.this.skip_final_snapshot == false && aws_db_instance.this.deletion_protection
    error_message = "backups, a final snapshot and deletion protection"
  }

  assert {
    condition     = one([for p in aws_db_parameter_group.this.parameter : p.value if p.name == "rds.force_ssl"]) == "1"
    error_message = "PostgreSQL must refuse connections without TLS"
  }

  assert {
    condition     = length(aws_vpc_security_group_ingress_rule.postgresql) == 1 && aws_vpc_security_group_ingress_rule.postgresql[0].referenced_security_group_id == "sg-cluster" && aws_vpc_security_group_ingress_rule.postgresql[0].from_port == 5432
    error_message = "only the cluster's security group reaches PostgreSQL"
  }
}

run "a_short_password_is_refused" {
  command = plan

  module {
    source = "../modules/database"
  }

  variables {
    password = "short"
  }

  expect_failures = [var.password]
}
