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
ServiceMonitor. The component is part of it so that the worker's and Triton's selectors never match each
other's pods.
*/}}
{{- define "streamguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "streamguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "streamguard.tritonSelectorLabels" -}}
app.kubernetes.io/name: {{ include "streamguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: triton
{{- end }}

{{/*
Common labels (the standard app.kubernetes.io/* set), for the worker's and for Triton's resources.
*/}}
{{- define "streamguard.labels" -}}
helm.sh/chart: {{ include "streamguard.chart" . }}
{{ include "streamguard.selectorLabels" . }}
{{ include "streamguard.commonLabels" . }}
{{- end }}

{{- define "streamguard.tritonLabels" -}}
helm.sh/chart: {{ include "streamguard.chart" . }}
{{ include "streamguard.tritonSelectorLabels" . }}
{{ include "streamguard.commonLabels" . }}
{{- end }}

{{- define "streamguard.commonLabels" -}}
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
An image reference from a dict with repository, tag and digest: repository@digest when a digest is set,
else repository:tag with the tag defaulting to the chart's appVersion. Called with (list IMAGE $).
*/}}
{{- define "streamguard.imageRef" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
The worker's image: the lean Triton-client image, or the in-process image with the in-process backend.
*/}}
{{- define "streamguard.workerImage" -}}
{{- if eq .Values.detectors.backend "inprocess" }}
{{- include "streamguard.imageRef" (list .Values.inprocess.image .) }}
{{- else }}
{{- include "streamguard.imageRef" (list .Values.image .) }}
{{- end }}
{{- end }}

{{- define "streamguard.workerImagePullPolicy" -}}
{{- if eq .Values.detectors.backend "inprocess" }}{{ .Values.inprocess.image.pullPolicy }}{{ else }}{{ .Values.image.pullPolicy }}{{ end }}
{{- end }}

{{/*
Whether the chart deploys Triton ("true" or ""): the Triton backend with triton.server.enabled.
*/}}
{{- define "streamguard.tritonDeployed" -}}
{{- if and (eq .Values.detectors.backend "triton") .Values.triton.server.enabled }}true{{ end }}
{{- end }}

{{- define "streamguard.tritonName" -}}
{{- printf "%s-triton" (include "streamguard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "streamguard.tritonHeadlessName" -}}
{{- printf "%s-triton-headless" (include "streamguard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The worker's gRPC target for Triton: triton.url, else the chart's headless Service through gRPC's dns
resolver (every ready Triton pod's address; the worker balances round-robin over them).
*/}}
{{- define "streamguard.tritonUrl" -}}
{{- if .Values.triton.url }}
{{- .Values.triton.url }}
{{- else if .Values.triton.server.enabled }}
{{- printf "dns:///%s.%s.svc.%s:8001" (include "streamguard.tritonHeadlessName" .) .Release.Namespace .Values.clusterDomain }}
{{- else }}
{{- fail "triton.url is required when triton.server.enabled is false and detectors.backend is triton" }}
{{- end }}
{{- end }}

{{/*
The Triton image and the image the model repository is copied from (the Triton image by default).
*/}}
{{- define "streamguard.tritonImage" -}}
{{- include "streamguard.imageRef" (list .Values.triton.server.image .) }}
{{- end }}

{{- define "streamguard.modelRepositoryImage" -}}
{{- $source := .Values.triton.server.modelRepository.image }}
{{- if $source.repository }}
{{- include "streamguard.imageRef" (list $source .) }}
{{- else }}
{{- include "streamguard.tritonImage" . }}
{{- end }}
{{- end }}

{{/*
The Secret the chart writes for KEDA's TriggerAuthentication: the kafka scaler's non-secret modes (tls,
sasl, OAuth endpoint and scopes), which KEDA reads only from Secrets there.
*/}}
{{- define "streamguard.kedaKafkaName" -}}
{{- printf "%s-keda-kafka" (include "streamguard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Whether KEDA needs a TriggerAuthentication ("true" or ""): Kafka TLS or SASL.
*/}}
{{- define "streamguard.kedaAuth" -}}
{{- if and .Values.keda.enabled (or (eq (include "streamguard.kafkaTls" .) "true") .Values.kafka.sasl.mechanism) }}true{{ end }}
{{- end }}

{{/*
The KEDA kafka scaler's `sasl` mode for the worker's SASL mechanism.
*/}}
{{- define "streamguard.kedaSasl" -}}
{{- $m := .Values.kafka.sasl.mechanism | upper }}
{{- if eq $m "PLAIN" }}plaintext
{{- else if eq $m "SCRAM-SHA-256" }}scram_sha256
{{- else if eq $m "SCRAM-SHA-512" }}scram_sha512
{{- else if eq $m "OAUTHBEARER" }}oauthbearer
{{- else }}
{{- fail (printf "kafka.sasl.mechanism %q: the chart supports PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 and OAUTHBEARER" .Values.kafka.sasl.mechanism) }}
{{- end }}
{{- end }}

{{/*
Whether the connection to Kafka uses TLS ("true"/"false").
*/}}
{{- define "streamguard.kafkaTls" -}}
{{- has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}
{{- end }}

{{/*
Checks of combinations the schema cannot express; included by the worker Deployment, so every render runs them.
*/}}
{{- define "streamguard.validate" -}}
{{- $processes := int .Values.worker.processes }}
{{- if gt (int .Values.worker.processes) (int .Values.worker.inputTopicPartitions) }}
{{- fail (printf "worker.processes %v exceeds worker.inputTopicPartitions %v: the extra consumers would get no partition" .Values.worker.processes .Values.worker.inputTopicPartitions) }}
{{- end }}
{{- if and (not .Values.keda.enabled) (gt (mul (int .Values.replicaCount) $processes) (int .Values.worker.inputTopicPartitions)) }}
{{- fail (printf "replicaCount %v x worker.processes %v exceeds worker.inputTopicPartitions %v: the extra consumers would get no partition and sit idle, never Ready" .Values.replicaCount .Values.worker.processes .Values.worker.inputTopicPartitions) }}
{{- end }}
{{- if and .Values.keda.enabled (gt (mul (int .Values.keda.fallback.replicas) $processes) (int .Values.worker.inputTopicPartitions)) }}
{{- fail (printf "keda.fallback.replicas %v x worker.processes %v exceeds worker.inputTopicPartitions %v" .Values.keda.fallback.replicas .Values.worker.processes .Values.worker.inputTopicPartitions) }}
{{- end }}
{{- if and .Values.kafka.sasl.mechanism (not (has .Values.kafka.securityProtocol (list "SASL_PLAINTEXT" "SASL_SSL"))) }}
{{- fail "kafka.sasl.mechanism is set but kafka.securityProtocol is not SASL_PLAINTEXT or SASL_SSL" }}
{{- end }}
{{- if and (not .Values.kafka.sasl.mechanism) (has .Values.kafka.securityProtocol (list "SASL_PLAINTEXT" "SASL_SSL")) }}
{{- fail (printf "kafka.securityProtocol %s needs kafka.sasl.mechanism" .Values.kafka.securityProtocol) }}
{{- end }}
{{- if ne (empty .Values.redis.tls.certKey) (empty .Values.redis.tls.keyKey) }}
{{- fail "redis.tls.certKey and redis.tls.keyKey go together (the client certificate and its key)" }}
{{- end }}
{{- if and .Values.redis.tls.certKey (not .Values.redis.tls.existingSecret) }}
{{- fail "redis.tls.certKey needs redis.tls.existingSecret" }}
{{- end }}
{{- if and .Values.kafka.sasl.mechanism (not .Values.kafka.sasl.existingSecret) }}
{{- fail "kafka.sasl.existingSecret is required when kafka.sasl.mechanism is set" }}
{{- end }}
{{- if and (eq (include "streamguard.kafkaTls" .) "true") (not .Values.kafka.tls.existingSecret) }}
{{- fail (printf "kafka.tls.existingSecret (the brokers' CA) is required with kafka.securityProtocol %s" .Values.kafka.securityProtocol) }}
{{- end }}
{{- if ne (empty .Values.kafka.tls.certKey) (empty .Values.kafka.tls.keyKey) }}
{{- fail "kafka.tls.certKey and kafka.tls.keyKey go together (the client certificate and its key)" }}
{{- end }}
{{- if and .Values.kafka.tls.keyPasswordKey (not .Values.kafka.tls.keyKey) }}
{{- fail "kafka.tls.keyPasswordKey needs kafka.tls.keyKey" }}
{{- end }}
{{- if and .Values.keda.enabled (eq (.Values.kafka.sasl.mechanism | upper) "OAUTHBEARER") (not (and .Values.keda.oauth.existingSecret .Values.keda.oauth.tokenEndpointUri)) }}
{{- fail "with KEDA and OAUTHBEARER, keda.oauth.existingSecret and keda.oauth.tokenEndpointUri are required (KEDA fetches its own tokens)" }}
{{- end }}
{{- if and .Values.triton.tls.enabled (eq .Values.detectors.backend "triton") (not .Values.triton.tls.clientSecret) }}
{{- fail "triton.tls.clientSecret (the CA, and with mutual the client certificate) is required with triton.tls.enabled" }}
{{- end }}
{{- if and .Values.triton.tls.enabled (include "streamguard.tritonDeployed" .) (not .Values.triton.tls.serverSecret) }}
{{- fail "triton.tls.serverSecret (the server's certificate and key) is required with triton.tls.enabled" }}
{{- end }}
{{- if and (include "streamguard.tritonDeployed" .) (eq .Values.triton.server.modelRepository.source "pvc") (not .Values.triton.server.modelRepository.pvc.claimName) }}
{{- fail "triton.server.modelRepository.pvc.claimName is required with modelRepository.source pvc" }}
{{- end }}
{{- $models := .Values.triton.server.models }}
{{- if and (include "streamguard.tritonDeployed" .) .Values.triton.trunkModel (not (has "*" $models)) (not (has .Values.triton.trunkModel $models)) }}
{{- fail (printf "triton.trunkModel %q is not among triton.server.models %v: the workers would call a model Triton never loaded (load it and its parts, or set triton.trunkModel \"\" for the whole models)" .Values.triton.trunkModel $models) }}
{{- end }}
{{- if and (eq .Values.detectors.backend "triton") (not .Values.triton.server.enabled) (not .Values.triton.url) }}
{{- fail "triton.url is required when triton.server.enabled is false and detectors.backend is triton" }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (eq .Values.detectors.backend "triton") (not .Values.triton.server.enabled) (not .Values.networkPolicy.worker.triton.to) }}
{{- fail "networkPolicy.worker.triton.to (the external Triton's peers) is required with triton.server.enabled=false and networkPolicy.enabled" }}
{{- end }}
{{- end }}
