output "bucket_name" {
  description = "Name of the artifact bucket."
  value       = aws_s3_bucket.artifacts.bucket
}

output "bucket_arn" {
  description = "ARN of the artifact bucket."
  value       = aws_s3_bucket.artifacts.arn
}

output "mlflow_artifact_root" {
  description = "MLflow's default artifact root (mlflow server --default-artifact-root)."
  value       = "s3://${aws_s3_bucket.artifacts.bucket}/mlflow"
}

output "dvc_remote_prefix" {
  description = "Key prefix of the DVC remote in the bucket (SHIPYARD_DVC_S3_PREFIX)."
  value       = "dvc"
}

output "read_write_policy_json" {
  description = "IAM policy that reads and writes the bucket's objects and uses its key, for the platform's IRSA role."
  value       = data.aws_iam_policy_document.read_write.json
}
