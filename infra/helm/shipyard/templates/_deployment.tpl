{{- /*
One Shipyard process as a Deployment: the image, the platform's environment, the security context and
writable volumes every such pod has. Called with a dict:
  root (the top context), component, args (the command after `python -m`), env (more entries, a YAML
  list as a string), ports (list of dicts name/port), probes (bool: /healthz and /readyz on the "http"
  port; else /metrics on "metrics"; probeSpec, a YAML string, replaces both), replicas (left out: an
  autoscaler owns it), grace (terminationGracePeriodSeconds),
  resources, gpu (bool: the gpu image, GPU limits, node selector, tolerations), serviceAccount (one
  whose API token is mounted; else the platform's, unmounted), internal
  (bool: a server the platform uses, such as Prefect's, not a client of it: none of the platform's
  environment or secrets, and no shipyard.io/platform label, so the NetworkPolicies keep it out).
*/ -}}
{{- define "shipyard.deployment" -}}
{{- $ := .root -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "shipyard.name" (list $ .component) }}
  namespace: {{ $.Release.Namespace }}
  labels:
    {{- include "shipyard.labels" (list $ .component) | nindent 4 }}
spec:
  {{- if hasKey . "replicas" }}
  replicas: {{ .replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "shipyard.selectorLabels" (list $ .component) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "shipyard.labels" (list $ .component) | nindent 8 }}
        {{- if not .internal }}
        shipyard.io/platform: "true"
        {{- end }}
      annotations:
        checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") $ | sha256sum }}
    spec:
      {{- include "shipyard.podCommon" $ | nindent 6 }}
      {{- if .serviceAccount }}
      serviceAccountName: {{ .serviceAccount }}
      automountServiceAccountToken: true
      {{- else }}
      {{- if not .internal }}
      serviceAccountName: {{ include "shipyard.serviceAccountName" $ }}
      {{- end }}
      automountServiceAccountToken: false
      {{- end }}
      terminationGracePeriodSeconds: {{ .grace | default 30 }}
      {{- if .gpu }}
      {{- with $.Values.workers.gpu.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $.Values.workers.gpu.runtimeClassName }}
      runtimeClassName: {{ . }}
      {{- end }}
      {{- with $.Values.workers.gpu.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ ternary (include "shipyard.gpuImage" $) (include "shipyard.image" $) (.gpu | default false) | quote }}
          imagePullPolicy: {{ $.Values.image.pullPolicy }}
          command: ["python", "-m"]
          args:
            {{- toYaml .args | nindent 12 }}
          env:
            - name: POD_IP
              valueFrom:
                fieldRef:
                  fieldPath: status.podIP
            {{- if not .internal }}
            {{- include "shipyard.platformEnv" $ | nindent 12 }}
            {{- end }}
            {{- with .env }}
            {{- . | nindent 12 }}
            {{- end }}
          {{- with .ports }}
          ports:
            {{- range . }}
            - name: {{ .name }}
              containerPort: {{ .port }}
              protocol: TCP
            {{- end }}
          {{- end }}
          {{- if .probeSpec }}
          {{- .probeSpec | nindent 10 }}
          {{- else if .probes }}
          {{- include "shipyard.probes" . | nindent 10 }}
          {{- else }}
          {{- include "shipyard.metricsProbes" . | nindent 10 }}
          {{- end }}
          resources:
            {{- $resources := deepCopy .resources }}
            {{- if .gpu }}
            {{- $gpus := $.Values.workers.gpu.gpusPerWorker }}
            {{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" $gpus) ($resources.limits | default dict)) }}
            {{- $_ := set $resources "requests" (merge (dict "nvidia.com/gpu" $gpus) ($resources.requests | default dict)) }}
            {{- end }}
            {{- toYaml $resources | nindent 12 }}
          securityContext:
            {{- include "shipyard.containerSecurityContext" $ | nindent 12 }}
          volumeMounts:
            {{- include "shipyard.volumeMounts" (list $ (not .internal)) | nindent 12 }}
      volumes:
        {{- include "shipyard.volumes" (list $ (not .internal)) | nindent 8 }}
{{- end -}}

{{/* A service's probes: alive while /healthz answers, in the Service's endpoints while /readyz does. */}}
{{- define "shipyard.probes" -}}
startupProbe:
  httpGet: {path: /healthz, port: http}
  periodSeconds: 5
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /healthz, port: http}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: http}
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 2
{{- end -}}

{{/* A worker's or the scaler's: no HTTP API, but its /metrics answers while it lives. */}}
{{- define "shipyard.metricsProbes" -}}
startupProbe:
  httpGet: {path: /metrics, port: metrics}
  periodSeconds: 5
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /metrics, port: metrics}
  periodSeconds: 20
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /metrics, port: metrics}
  periodSeconds: 10
  timeoutSeconds: 5
{{- end -}}
