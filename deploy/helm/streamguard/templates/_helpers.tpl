{{/*
The chart's name, truncated to 63 characters (Kubernetes names are DNS labels).
*/}}
{{- define "streamguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The fully qualified app name: release-chart, or the release name alone when it already contains the
chart name. Truncated to 63 characters.
*/}}
{{- define "streamguard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "streamguard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: the immutable subset used by the Deployment's selector, the Service, the PDB and the
ServiceMonitor. The component is part of it so that a Triton Deployment added later under the same
release name never matches the worker's selector.
*/}}
{{- define "streamguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "streamguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: worker
{{- end }}

{{/*
Common labels (the standard app.kubernetes.io/* set).
*/}}
{{- define "streamguard.labels" -}}
helm.sh/chart: {{ include "streamguard.chart" . }}
{{ include "streamguard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: streamguard
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The name of the ServiceAccount the worker runs as.
*/}}
{{- define "streamguard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "streamguard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference; the tag defaults to the chart's appVersion.
*/}}
{{- define "streamguard.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
The KEDA kafka scaler's `sasl` mode for the worker's kafka-python SASL mechanism; fails for a mechanism
the worker cannot use with a username and password.
*/}}
{{- define "streamguard.kedaSasl" -}}
{{- $m := .Values.kafka.sasl.mechanism | upper }}
{{- if eq $m "PLAIN" }}plaintext
{{- else if eq $m "SCRAM-SHA-256" }}scram_sha256
{{- else if eq $m "SCRAM-SHA-512" }}scram_sha512
{{- else }}
{{- fail (printf "kafka.sasl.mechanism %q: the chart supports PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512" .Values.kafka.sasl.mechanism) }}
{{- end }}
{{- end }}

{{/*
Whether the connection to Kafka uses TLS ("true"/"false").
*/}}
{{- define "streamguard.kafkaTls" -}}
{{- has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}
{{- end }}
