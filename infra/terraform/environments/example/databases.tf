# MLflow keeps its tracking store and its users in two databases beside the platform's, on the same RDS
# instance. RDS creates only the platform's; a one-off Job inside the cluster (the only place that
# reaches the private instance) creates the other two if they are missing, before the chart starts.

resource "kubernetes_namespace_v1" "shipyard" {
  metadata {
    name = var.namespace
  }
}

resource "kubernetes_secret_v1" "database_admin" {
  metadata {
    name      = "${var.name}-database-admin"
    namespace = kubernetes_namespace_v1.shipyard.metadata[0].name
  }

  data = {
    PGHOST     = module.database.address
    PGPORT     = tostring(module.database.port)
    PGUSER     = module.database.username
    PGPASSWORD = random_password.database.result
    PGDATABASE = module.database.database_name
  }
}

resource "kubernetes_job_v1" "extra_databases" {
  metadata {
    name      = "${var.name}-databases"
    namespace = kubernetes_namespace_v1.shipyard.metadata[0].name
  }

  spec {
    backoff_limit = 6

    template {
      metadata {}
      spec {
        restart_policy                  = "OnFailure"
        automount_service_account_token = false
        node_selector                   = module.cluster.cpu_node_selector

        security_context {
          run_as_non_root = true
          run_as_user     = 10001
          run_as_group    = 10001
          seccomp_profile {
            type = "RuntimeDefault"
          }
        }

        container {
          name              = "create-databases"
          image             = var.postgres_client_image
          image_pull_policy = "Always"
          command           = ["/bin/sh", "-ec", local.create_databases]

          env {
            name  = "PGSSLMODE"
            value = "require"
          }

          env_from {
            secret_ref {
              name = kubernetes_secret_v1.database_admin.metadata[0].name
            }
          }

          security_context {
            allow_privilege_escalation = false
            read_only_root_filesystem  = true
            capabilities {
              drop = ["ALL"]
            }
          }

          resources {
            requests = { cpu = "50m", memory = "64Mi" }
            limits   = { cpu = "500m", memory = "256Mi" }
          }
        }
      }
    }
  }

  wait_for_completion = true

  timeouts {
    create = "10m"
  }
}

locals {
  # psql reads the connection from PG* variables; CREATE DATABASE cannot run in a DO block, so test first.
  create_databases = join("\n", [for db in local.extra_databases : <<-SH
    if [ -z "$(psql -tAc "SELECT 1 FROM pg_database WHERE datname = '${db}'")" ]; then
      psql -v ON_ERROR_STOP=1 -c 'CREATE DATABASE ${db}'
    fi
  SH
  ])
}
