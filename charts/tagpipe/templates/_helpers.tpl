{{/* Names, labels and the small bits every template shares. */}}

{{- define "tagpipe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tagpipe.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<component>", e.g. tagpipe-operator; call with (dict "ctx" $ "c" "operator"). */}}
{{- define "tagpipe.componentName" -}}
{{- printf "%s-%s" (include "tagpipe.fullname" .ctx | trunc 50 | trimSuffix "-") .c -}}
{{- end -}}

{{- define "tagpipe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tagpipe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tagpipe.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .c }}
{{- end -}}

{{- define "tagpipe.labels" -}}
helm.sh/chart: {{ include "tagpipe.chart" .ctx }}
{{ include "tagpipe.selectorLabels" . }}
app.kubernetes.io/part-of: tagpipe
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* A tagpipe image reference; call with (dict "ctx" $ "c" "gateway"). */}}
{{- define "tagpipe.image" -}}
{{- $images := .ctx.Values.images -}}
{{- $repo := (index $images .c).repository -}}
{{- $tag := default .ctx.Chart.AppVersion $images.tag -}}
{{- if $images.registry -}}
{{- printf "%s/%s:%s" $images.registry $repo $tag -}}
{{- else -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
{{- end -}}

{{/* A third-party image from {registry, repository, tag}. */}}
{{- define "tagpipe.plainImage" -}}
{{- printf "%s/%s:%s" .registry .repository .tag -}}
{{- end -}}

{{- define "tagpipe.pullSecrets" -}}
{{- with .Values.images.pullSecrets -}}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end -}}
{{- end -}}

{{- define "tagpipe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tagpipe.componentName" (dict "ctx" . "c" "operator")) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tagpipe.natsUrl" -}}
{{- $name := include "tagpipe.componentName" (dict "ctx" . "c" "nats") -}}
{{- if and .Values.nats.enabled .Values.nats.cluster.enabled -}}
{{- /* Every server by its pod name: a client reconnects to whichever is up. */ -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.nats.cluster.replicas) -}}
{{- $urls = append $urls (printf "nats://%s-%d.%s-headless.%s.svc:%d" $name $i $name $.Release.Namespace (int $.Values.nats.port)) -}}
{{- end -}}
{{- join "," $urls -}}
{{- else if .Values.nats.enabled -}}
{{- printf "nats://%s:%d" $name (int .Values.nats.port) -}}
{{- else -}}
{{- .Values.externalNats.url -}}
{{- end -}}
{{- end -}}

{{- define "tagpipe.redisUrl" -}}
{{- $name := include "tagpipe.componentName" (dict "ctx" . "c" "redis") -}}
{{- if and .Values.redis.enabled .Values.redis.sentinel.enabled -}}
{{- $hosts := list -}}
{{- range $i := until (int .Values.redis.sentinel.replicas) -}}
{{- $hosts = append $hosts (printf "%s-%d.%s.%s.svc:%d" $name $i $name $.Release.Namespace (int $.Values.redis.sentinel.port)) -}}
{{- end -}}
{{- printf "redis+sentinel://%s/%s/0" (join "," $hosts) .Values.redis.sentinel.masterName -}}
{{- else if .Values.redis.enabled -}}
{{- printf "redis://%s:%d/0" $name (int .Values.redis.port) -}}
{{- else -}}
{{- .Values.externalRedis.url -}}
{{- end -}}
{{- end -}}

{{/* The example TagPipeline's spec.nats: bundled server, a Secret, or a plain URL. */}}
{{- define "tagpipe.natsSpec" -}}
{{- if and .Values.nats.enabled .Values.nats.cluster.enabled -}}
{{- dict "url" (include "tagpipe.natsUrl" .) "streamReplicas" (min 3 (int .Values.nats.cluster.replicas)) | toYaml -}}
{{- else if .Values.nats.enabled -}}
{{- dict "url" (include "tagpipe.natsUrl" .) | toYaml -}}
{{- else if .Values.externalNats.existingSecret -}}
{{- dict "url" .Values.externalNats.url "credentialsSecretRef" (dict "name" .Values.externalNats.existingSecret "key" .Values.externalNats.existingSecretKey) | toYaml -}}
{{- else -}}
{{- dict "url" .Values.externalNats.url | toYaml -}}
{{- end -}}
{{- end -}}

{{- define "tagpipe.redisSpec" -}}
{{- if .Values.redis.enabled -}}
{{- dict "url" (include "tagpipe.redisUrl" .) | toYaml -}}
{{- else if .Values.externalRedis.existingSecret -}}
{{- dict "url" .Values.externalRedis.url "credentialsSecretRef" (dict "name" .Values.externalRedis.existingSecret "key" .Values.externalRedis.existingSecretKey) | toYaml -}}
{{- else -}}
{{- dict "url" .Values.externalRedis.url | toYaml -}}
{{- end -}}
{{- end -}}
