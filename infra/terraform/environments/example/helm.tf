# What runs on the cluster: the cluster autoscaler (adds and removes nodes, and starts GPU nodes from
# zero), NVIDIA's device plugin (advertises nvidia.com/gpu on GPU nodes), and Shipyard's chart wired
# to RDS, ElastiCache and the bucket, with its GPU workers placed on the GPU nodes.

resource "helm_release" "cluster_autoscaler" {
  name       = "cluster-autoscaler"
  namespace  = "kube-system"
  repository = "https://kubernetes.github.io/autoscaler"
  chart      = "cluster-autoscaler"
  version    = var.cluster_autoscaler_chart_version

  values = [yamlencode({
    cloudProvider = "aws"
    awsRegion     = var.region
    autoDiscovery = { clusterName = module.cluster.cluster_name }
    rbac = {
      serviceAccount = {
        name        = "cluster-autoscaler"
        annotations = { "eks.amazonaws.com/role-arn" = module.cluster.autoscaler_role_arn }
      }
    }
    extraArgs = {
      "balance-similar-node-groups"   = true
      "skip-nodes-with-system-pods"   = false
      "expander"                      = "least-waste"
      "scale-down-unneeded-time"      = "10m"
      "scale-down-delay-after-add"    = "10m"
      "skip-nodes-with-local-storage" = false
    }
    nodeSelector = module.cluster.cpu_node_selector
  })]
}

resource "helm_release" "nvidia_device_plugin" {
  name       = "nvidia-device-plugin"
  namespace  = "kube-system"
  repository = "https://nvidia.github.io/k8s-device-plugin"
  chart      = "nvidia-device-plugin"
  version    = var.nvidia_device_plugin_chart_version

  # On the GPU nodes alone, chosen by the GPU group's own labels rather than the chart's default affinity.
  values = [yamlencode({
    tolerations = module.cluster.gpu_tolerations
    affinity = {
      nodeAffinity = {
        requiredDuringSchedulingIgnoredDuringExecution = {
          nodeSelectorTerms = [{
            matchExpressions = [for key, value in module.cluster.gpu_node_selector : { key = key, operator = "In", values = [value] }]
          }]
        }
      }
    }
  })]
}

resource "helm_release" "shipyard" {
  name      = "shipyard"
  namespace = kubernetes_namespace_v1.shipyard.metadata[0].name
  chart     = "${path.module}/../../../helm/shipyard"
  timeout   = 900

  values = [yamlencode(local.shipyard_values)]

  # The URLs carry the generated passwords: kept out of plan output.
  set_sensitive {
    name  = "externalDatabase.url"
    value = local.database_url
  }

  set_sensitive {
    name  = "externalDatabase.mlflowUrl"
    value = local.mlflow_url
  }

  set_sensitive {
    name  = "externalDatabase.mlflowAuthUrl"
    value = local.mlflow_auth_url
  }

  set_sensitive {
    name  = "externalDatabase.prefectUrl"
    value = local.prefect_url
  }

  set_sensitive {
    name  = "externalRedis.url"
    value = local.redis_url
  }

  depends_on = [kubernetes_job_v1.extra_databases, helm_release.cluster_autoscaler, helm_release.nvidia_device_plugin]
}

locals {
  shipyard_values = {
    image      = { repository = var.image_repository, tag = var.image_tag }
    gpuImage   = { repository = var.gpu_image_repository, tag = var.image_tag }
    postgresql = { enabled = false }
    redis      = { enabled = false }
    # The platform pods' identity: MLflow and the workers reach the bucket through the IRSA role.
    serviceAccount = {
      name        = local.service_account
      annotations = { "eks.amazonaws.com/role-arn" = module.platform_role.role_arn }
    }
    mlflow = {
      artifactsDestination = module.storage.mlflow_artifact_root
      persistence          = { enabled = false }
    }
    extraEnv = [
      { name = "SHIPYARD_DVC_S3_BUCKET", value = module.storage.bucket_name },
      { name = "SHIPYARD_DVC_S3_PREFIX", value = module.storage.dvc_remote_prefix },
      { name = "SHIPYARD_DVC_S3_REGION", value = var.region },
    ]
    workers = {
      gpu = {
        enabled       = true
        gpusPerWorker = var.gpus_per_node
        nodeSelector  = module.cluster.gpu_node_selector
        tolerations   = module.cluster.gpu_tolerations
      }
    }
    scaler = { maxReplicas = var.gpu_max_nodes }
  }
}
