{{/* Names: <release>-shipyard, or the release name when it already says shipyard. */}}
{{- define "shipyard.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* One component's name: (list $ "serving") -> <fullname>-serving. */}}
{{- define "shipyard.name" -}}
{{- printf "%s-%s" (include "shipyard.fullname" (index . 0)) (index . 1) -}}
{{- end -}}

{{- define "shipyard.selectorLabels" -}}
app.kubernetes.io/name: shipyard
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "shipyard.labels" -}}
{{ include "shipyard.selectorLabels" . }}
app.kubernetes.io/part-of: shipyard
app.kubernetes.io/version: {{ (index . 0).Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ (index . 0).Release.Service }}
helm.sh/chart: {{ printf "%s-%s" (index . 0).Chart.Name (index . 0).Chart.Version }}
{{- end -}}

{{- define "shipyard.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "shipyard.fullname" .) -}}
{{- end -}}

{{/* repository:tag, or repository:tag@digest when a digest is given. */}}
{{- define "shipyard.imageRef" -}}
{{- $ref := printf "%s:%s" .image.repository (.image.tag | default .appVersion) -}}
{{- if .image.digest }}{{ $ref = printf "%s@%s" $ref .image.digest }}{{ end -}}
{{- $ref -}}
{{- end -}}

{{- define "shipyard.image" -}}
{{- include "shipyard.imageRef" (dict "image" .Values.image "appVersion" .Chart.AppVersion) -}}
{{- end -}}

{{- define "shipyard.gpuImage" -}}
{{- include "shipyard.imageRef" (dict "image" .Values.gpuImage "appVersion" .Chart.AppVersion) -}}
{{- end -}}

{{/* The pod-level security context of every pod: non-root, one uid, the runtime's seccomp profile. */}}
{{- define "shipyard.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Every container's: no privilege escalation, no capabilities, a read-only root filesystem. */}}
{{- define "shipyard.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "shipyard.secretEnv" -}}
- name: {{ index . 1 }}
  valueFrom:
    secretKeyRef:
      name: {{ include "shipyard.secretName" (index . 0) }}
      key: {{ index . 2 }}
{{- end -}}

{{- define "shipyard.url" -}}
{{- $ := index . 0 -}}
{{- $svc := index . 1 -}}
{{- printf "http://%s:%v" (include "shipyard.name" (list $ $svc)) (index $.Values $svc).port -}}
{{- end -}}

{{/* What every Shipyard process reads (shipyard_common.settings.PlatformSettings). */}}
{{- define "shipyard.platformEnv" -}}
- name: SHIPYARD_ENV
  value: {{ .Values.env | quote }}
- name: SHIPYARD_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: SHIPYARD_LOG_JSON
  value: "true"
- name: SHIPYARD_STATE_DIR
  value: /var/lib/shipyard
{{ include "shipyard.secretEnv" (list . "SHIPYARD_DB_URL" "db-url") }}
{{ include "shipyard.secretEnv" (list . "SHIPYARD_REDIS_URL" "redis-url") }}
{{ include "shipyard.secretEnv" (list . "SHIPYARD_TOKENS" "tokens") }}
- name: SHIPYARD_MLFLOW_TRACKING_URI
  value: {{ printf "http://%s:%v" (include "shipyard.name" (list . "mlflow")) .Values.mlflow.port | quote }}
- name: SHIPYARD_MLFLOW_AUTH
  value: "true"
- name: SHIPYARD_MLFLOW_USERNAME
  value: shipyard
- name: SHIPYARD_MLFLOW_PASSWORD_FILE
  value: /var/run/secrets/shipyard/mlflow-password
{{- range $svc := list "trainer" "registry" "serving" "monitor" }}
- name: SHIPYARD_{{ upper $svc }}_URL
  value: {{ include "shipyard.url" (list $ $svc) | quote }}
{{- end }}
{{- if .Values.pipelines.enabled }}
- name: SHIPYARD_PREFECT_API_URL
  value: {{ include "shipyard.prefectApi" . | quote }}
- name: PREFECT_API_URL
  value: {{ include "shipyard.prefectApi" . | quote }}
{{- end }}
- name: HOME
  value: /tmp
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The volumes every Shipyard container writes to or reads its secrets from (the root is read-only). */}}
{{- define "shipyard.volumeMounts" -}}
- name: state
  mountPath: /var/lib/shipyard
- name: tmp
  mountPath: /tmp
{{- if index . 1 }}
- name: mlflow-password
  mountPath: /var/run/secrets/shipyard
  readOnly: true
{{- end }}
{{- end -}}

{{/* (list $ withSecrets): the writable folders, and MLflow's password for the platform's clients. */}}
{{- define "shipyard.volumes" -}}
- name: state
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- if index . 1 }}
- name: mlflow-password
  secret:
    secretName: {{ include "shipyard.secretName" (index . 0) }}
    defaultMode: 0440
    items:
      - key: mlflow-password
        path: mlflow-password
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by every pod of the chart. */}}
{{- define "shipyard.podCommon" -}}
securityContext:
  {{- include "shipyard.podSecurityContext" . | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "shipyard.prefectApi" -}}
{{- printf "http://%s:%v/api" (include "shipyard.name" (list . "prefect")) .Values.pipelines.prefect.port -}}
{{- end -}}

{{/* The platform pods' service account: serviceAccount.name, else <fullname>. */}}
{{- define "shipyard.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "shipyard.fullname" .) -}}
{{- end -}}
