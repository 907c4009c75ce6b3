# `terraform test` with a mocked AWS provider: the artifact bucket stays private, versioned and encrypted.

mock_provider "aws" {
  source = "./mocks"
}

variables {
  bucket_name = "shipyard-test-artifacts"
}

run "the_bucket_is_private_versioned_and_encrypted" {
  command = plan

  module {
    source = "../modules/storage"
  }

  assert {
    condition = alltrue([
      aws_s3_bucket_public_access_block.artifacts.block_public_acls,
      aws_s3_bucket_public_access_block.artifacts.block_public_policy,
      aws_s3_bucket_public_access_block.artifacts.ignore_public_acls,
      aws_s3_bucket_public_access_block.artifacts.restrict_public_buckets,
    ])
    error_message = "every public access block setting must be on"
  }

  assert {
    condition     = aws_s3_bucket_versioning.artifacts.versioning_configuration[0].status == "Enabled"
    error_message = "the bucket must be versioned"
  }

  assert {
    condition     = one(one(aws_s3_bucket_server_side_encryption_configuration.artifacts.rule).apply_server_side_encryption_by_default).sse_algorithm == "aws:kms"
    error_message = "objects must be encrypted with the bucket's KMS key"
  }

  assert {
    condition     = aws_s3_bucket.artifacts.force_destroy == false
    error_message = "a destroy must not delete models and datasets by default"
  }

  assert {
    condition     = output.mlflow_artifact_root == "s3://shipyard-test-artifacts/mlflow"
    error_message = "MLflow's artifacts go under mlflow/"
  }
}

run "a_dotted_bucket_name_is_refused" {
  command = plan

  module {
    source = "../modules/storage"
  }

  variables {
    bucket_name = "shipyard.artifacts"
  }

  expect_failures = [var.bucket_name]
}
