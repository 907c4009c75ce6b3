# The root `terraform test` runs in: each *.tftest.hcl here plans one module of ../modules (its run
# blocks name it) against a mocked AWS provider (mocks/). Nothing is created and no account is needed.
terraform {
  required_version = "= 1.11.4"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "= 5.100.0"
    }
  }
}
