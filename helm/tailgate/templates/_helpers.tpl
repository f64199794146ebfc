{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "tailgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; kept short enough for the "-peers" suffix. */}}
{{- define "tailgate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tailgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tailgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tailgate
{{- end }}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "tailgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tailgate.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tailgate.componentLabels" -}}
{{ include "tailgate.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tailgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "tailgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tailgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tailgate.secretName" -}}
{{- default (include "tailgate.fullname" .) .Values.connections.existingSecret }}
{{- end }}

{{- define "tailgate.rulesConfigMap" -}}
{{- default (printf "%s-rules" (include "tailgate.fullname" .)) .Values.rules.existingConfigMap }}
{{- end }}

{{/* The headless Service's name: peers find each other through its DNS records. */}}
{{- define "tailgate.peersService" -}}
{{- printf "%s-peers" (include "tailgate.fullname" .) }}
{{- end }}

{{/* The gateway's configuration file: chart-managed keys laid over gateway.config. */}}
{{- define "tailgate.gatewayConfig" -}}
{{- $managed := dict
  "receiver" (dict "grpc_listen" "0.0.0.0:4317" "http_listen" "0.0.0.0:4318")
  "rules" (dict "file" (printf "/etc/tailgate/rules/%s" .Values.rules.key) "check_interval_secs" .Values.rules.checkIntervalSecs)
  "rabbitmq" (dict "exchange" .Values.exchange)
  "cluster" (dict "listen" "0.0.0.0:4319" "dns" (printf "%s.%s.svc.%s:4319" (include "tailgate.peersService" .) .Release.Namespace .Values.clusterDomain))
  "admin" (dict "listen" "0.0.0.0:8888")
  "shutdown" (dict "grace_secs" .Values.gateway.shutdownGraceSecs) }}
{{- toYaml (mustMergeOverwrite (deepCopy .Values.gateway.config) $managed) }}
{{- end }}

{{- define "tailgate.ingesterConfig" -}}
{{- $managed := dict
  "rabbitmq" (dict "exchange" .Values.exchange)
  "admin" (dict "listen" "0.0.0.0:8889")
  "shutdown" (dict "grace_secs" .Values.ingester.shutdownGraceSecs) }}
{{- if .Values.journeys.finder }}
{{- $_ := set $managed "journeys" (dict
  "rules_file" (printf "/etc/tailgate/rules/%s" .Values.rules.key)
  "interval_secs" .Values.journeys.intervalSecs
  "trace_link" .Values.journeys.traceLink) }}
{{- end }}
{{- toYaml (mustMergeOverwrite (deepCopy .Values.ingester.config) $managed) }}
{{- end }}

{{/* Default anti-affinity: spread a component's pods over nodes. */}}
{{- define "tailgate.affinity" -}}
{{- if .affinity }}
{{- toYaml .affinity }}
{{- else if eq .mode "hard" }}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "tailgate.selectorLabels" . | nindent 10 }}
{{- else }}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "tailgate.selectorLabels" . | nindent 12 }}
{{- end }}
{{- end }}
