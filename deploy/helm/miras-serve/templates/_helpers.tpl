{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "miras-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name shared by every object of the release. */}}
{{- define "miras-serve.fullname" -}}
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

{{- define "miras-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "miras-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "miras-serve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "miras-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "miras-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "miras-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* What --model gets: a shipped model's name, or the checkpoint directory on the mounted volume. */}}
{{- define "miras-serve.modelArg" -}}
{{- if eq .Values.model.source "shipped" }}
{{- .Values.model.name }}
{{- else if .Values.model.path }}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (trimPrefix "/" .Values.model.path) }}
{{- else }}
{{- .Values.model.mountPath }}
{{- end }}
{{- end }}

{{- define "miras-serve.pvcName" -}}
{{- default (printf "%s-models" (include "miras-serve.fullname" .)) .Values.model.pvc.existingClaim }}
{{- end }}

{{- define "miras-serve.apiKeySecretName" -}}
{{- default (printf "%s-api-key" (include "miras-serve.fullname" .)) .Values.apiKey.existingSecret }}
{{- end }}

{{- define "miras-serve.apiKeyEnabled" -}}
{{- if or .Values.apiKey.value .Values.apiKey.existingSecret }}true{{ end }}
{{- end }}

{{/* The server command line: one flag per `server` value; the API key travels in env, not here. */}}
{{- define "miras-serve.args" -}}
- --model
- {{ include "miras-serve.modelArg" . | quote }}
- --host
- {{ .Values.server.host | quote }}
- --port
- {{ .Values.server.port | int64 | quote }}
{{- with .Values.server.servedModelName }}
- --served-model-name
- {{ . | quote }}
{{- end }}
- --dtype
- {{ .Values.server.dtype | quote }}
- --device
- {{ .Values.server.device | quote }}
{{- with .Values.server.allowedOrigins }}
- --allowed-origins
{{- range . }}
- {{ . | quote }}
{{- end }}
{{- end }}
{{- with .Values.server.maxNumSeqs }}
- --max-num-seqs
- {{ . | int64 | quote }}
{{- end }}
- --gpu-memory-utilization
- {{ .Values.server.gpuMemoryUtilization | quote }}
- --max-num-batched-tokens
- {{ .Values.server.maxNumBatchedTokens | int64 | quote }}
- --max-prompt-tokens
- {{ .Values.server.maxPromptTokens | int64 | quote }}
- --max-queued-requests
- {{ .Values.server.maxQueuedRequests | int64 | quote }}
- --state-cache-gb
- {{ .Values.server.stateCacheGb | quote }}
- --sse-ping-interval
- {{ .Values.server.ssePingInterval | quote }}
{{- if not (kindIs "invalid" .Values.server.dotPrecision) }}
- --dot-precision
- {{ .Values.server.dotPrecision | quote }}
{{- end }}
{{- if .Values.server.enforceEager }}
- --enforce-eager
{{- end }}
- --shutdown-timeout
- {{ .Values.server.shutdownTimeout | int64 | quote }}
- --state-cache-scope
- {{ .Values.server.stateCacheScope | quote }}
{{- if .Values.server.metricsRequireKey }}
- --metrics-require-key
{{- end }}
{{- if not (kindIs "invalid" .Values.server.maxRequestBytes) }}
- --max-request-bytes
- {{ .Values.server.maxRequestBytes | int64 | quote }}
{{- end }}
{{- if not (kindIs "invalid" .Values.server.maxPromptChars) }}
- --max-prompt-chars
- {{ .Values.server.maxPromptChars | int64 | quote }}
{{- end }}
- --request-read-timeout
- {{ .Values.server.requestReadTimeout | quote }}
- --timeout-keep-alive
- {{ .Values.server.timeoutKeepAlive | quote }}
- --limit-concurrency
- {{ .Values.server.limitConcurrency | int64 | quote }}
- --log-level
- {{ .Values.server.logLevel | quote }}
{{- if .Values.sharedStore.enabled }}
- --state-redis-url
- {{ include "miras-serve.redisUrl" . | quote }}
- --state-redis-gb
- {{ .Values.sharedStore.gb | quote }}
- --state-redis-ttl
- {{ .Values.sharedStore.ttlSeconds | quote }}
{{- end }}
{{- range .Values.server.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* Pod grace period: long enough for the preStop sleep plus the server's whole drain. */}}
{{- define "miras-serve.terminationGracePeriodSeconds" -}}
{{- $drain := add .Values.drain.preStopSleepSeconds .Values.server.shutdownTimeout }}
{{- if kindIs "invalid" .Values.drain.terminationGracePeriodSeconds }}
{{- add $drain .Values.drain.extraGraceSeconds }}
{{- else if lt (int .Values.drain.terminationGracePeriodSeconds) (int $drain) }}
{{- fail (printf "drain.terminationGracePeriodSeconds (%v) must be >= drain.preStopSleepSeconds + server.shutdownTimeout (%v), or rollouts cut streams" .Values.drain.terminationGracePeriodSeconds $drain) }}
{{- else }}
{{- .Values.drain.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Combinations the schema cannot express; each fails the render with the values to change. */}}
{{- define "miras-serve.validate" -}}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.existingClaim) (not .Values.model.pvc.create) }}
{{- fail "model.source=pvc needs model.pvc.existingClaim or model.pvc.create=true" }}
{{- end }}
{{- if and (eq .Values.model.source "hostPath") (not .Values.model.hostPath.path) }}
{{- fail "model.source=hostPath needs model.hostPath.path" }}
{{- end }}
{{- if and (eq .Values.server.device "cuda") (not .Values.gpu.enabled) }}
{{- fail "server.device=cuda needs gpu.enabled=true (the pod would get no GPU)" }}
{{- end }}
{{- if and .Values.apiKey.value .Values.apiKey.existingSecret }}
{{- fail "set apiKey.value or apiKey.existingSecret, not both" }}
{{- end }}
{{- if and .Values.server.metricsRequireKey (not (include "miras-serve.apiKeyEnabled" .)) }}
{{- fail "server.metricsRequireKey needs an API key (apiKey.value or apiKey.existingSecret)" }}
{{- end }}
{{- $liveness := mul .Values.probes.liveness.periodSeconds .Values.probes.liveness.failureThreshold }}
{{- if le (int $liveness) (int .Values.server.shutdownTimeout) }}
{{- fail (printf "probes.liveness periodSeconds x failureThreshold (%v s) must exceed server.shutdownTimeout (%v s): /health is 503 while draining" $liveness .Values.server.shutdownTimeout) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (kindIs "invalid" .Values.autoscaling.targetCPUUtilizationPercentage) (not .Values.autoscaling.requestsWaiting.enabled) }}
{{- fail "autoscaling.enabled needs targetCPUUtilizationPercentage or requestsWaiting.enabled" }}
{{- end }}
{{- if and .Values.sharedStore.externalUrl (not (hasPrefix "redis://" .Values.sharedStore.externalUrl)) }}
{{- fail "sharedStore.externalUrl must be a redis:// address" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must be <= autoscaling.maxReplicas" }}
{{- end }}
{{- end }}

{{/* Labels of the router's and the store's pods: another app name, so the server's Service, PDB and HPA
never select them. */}}
{{- define "miras-serve.componentSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-%s" (include "miras-serve.name" .root) .component | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "miras-serve.componentLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "miras-serve.componentSelectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{/* The shared store's address: an external one, or the chart's own Redis Service. */}}
{{- define "miras-serve.redisUrl" -}}
{{- if .Values.sharedStore.externalUrl }}
{{- .Values.sharedStore.externalUrl }}
{{- else }}
{{- printf "redis://%s-redis.%s.svc:6379/0" (include "miras-serve.fullname" .) .Release.Namespace }}
{{- end }}
{{- end }}
