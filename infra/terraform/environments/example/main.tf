# One Shipyard environment on AWS: the network, an EKS cluster (CPU nodes, GPU nodes from zero), the
# artifact bucket, RDS PostgreSQL and ElastiCache Redis, wired together, and the platform installed on
# the cluster with Helm (helm.tf).

module "network" {
  source = "../../modules/network"

  name               = var.name
  cluster_name       = var.name
  cidr_block         = var.vpc_cidr_block
  availability_zones = var.availability_zones
}

module "cluster" {
  source = "../../modules/cluster"

  name                   = var.name
  kubernetes_version     = var.kubernetes_version
  subnet_ids             = module.network.private_subnet_ids
  endpoint_public_access = var.endpoint_public_access
  public_access_cidrs    = var.public_access_cidrs
  admin_principal_arns   = var.cluster_admin_arns
  cpu_instance_types     = var.cpu_instance_types
  gpu_instance_types     = var.gpu_instance_types
  gpu_count_per_node     = var.gpus_per_node
  gpu_max_size           = var.gpu_max_nodes
}

module "storage" {
  source = "../../modules/storage"

  bucket_name = var.bucket_name
}

# The platform's pods (MLflow's artifact proxy, the workers' and the monitor's DVC) reach the bucket
# through this role, by their service account; no access key exists.
module "platform_role" {
  source = "../../modules/irsa"

  name              = "${var.name}-platform"
  oidc_provider_arn = module.cluster.oidc_provider_arn
  oidc_issuer       = module.cluster.oidc_issuer
  service_accounts  = ["${var.namespace}:${local.service_account}"]
  policy_json       = module.storage.read_write_policy_json
}

resource "random_password" "database" {
  length  = 32
  special = false # it goes into URLs unescaped
}

resource "random_password" "redis" {
  length  = 32
  special = false
}

module "database" {
  source = "../../modules/database"

  name                       = "${var.name}-platform"
  vpc_id                     = module.network.vpc_id
  subnet_ids                 = module.network.private_subnet_ids
  allowed_security_group_ids = [module.cluster.cluster_security_group_id]
  instance_class             = var.database_instance_class
  password                   = random_password.database.result
}

module "redis" {
  source = "../../modules/redis"

  name                       = "${var.name}-broker"
  vpc_id                     = module.network.vpc_id
  subnet_ids                 = module.network.private_subnet_ids
  allowed_security_group_ids = [module.cluster.cluster_security_group_id]
  node_type                  = var.redis_node_type
  auth_token                 = random_password.redis.result
}

locals {
  service_account = "shipyard"
  database_host   = "${module.database.username}:${random_password.database.result}@${module.database.address}:${module.database.port}"
  # TLS to both: RDS is set to refuse anything else, ElastiCache speaks only TLS.
  database_url    = "postgresql+psycopg2://${local.database_host}/${module.database.database_name}?sslmode=require"
  mlflow_url      = "postgresql://${local.database_host}/mlflow?sslmode=require"
  mlflow_auth_url = "postgresql://${local.database_host}/mlflow_auth?sslmode=require"
  # Prefect's server runs on asyncpg, which takes ssl= where psycopg takes sslmode=.
  prefect_url = "postgresql+asyncpg://${local.database_host}/prefect?ssl=require"
  redis_url   = "rediss://:${random_password.redis.result}@${module.redis.primary_endpoint}:${module.redis.port}/0?ssl_cert_reqs=required"
  # Created beside the platform's own by a one-off Job (databases.tf): MLflow's two and Prefect's.
  extra_databases = ["mlflow", "mlflow_auth", "prefect"]
}
