output "key_arn" {
  description = "ARN of the key, for the resources that encrypt with it."
  value       = aws_kms_key.this.arn
}

output "key_id" {
  description = "ID of the key."
  value       = aws_kms_key.this.key_id
}
