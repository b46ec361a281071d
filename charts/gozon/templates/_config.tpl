{{/*
Helpers of the gozon chart: the settings the processes read: the ConfigMap, the Secret, tracing and identity.
Every name is prefixed `gozon.` (Helm shares template names across a chart and its
subcharts); each says what it returns and how to call it. The helpers are split by topic
over the `_*.tpl` files of this folder.
*/}}

{{/*
gozon.secretName -- the Secret the processes read their secret settings from: existingSecret,
or the chart's own.
Usage: {{ include "gozon.secretName" . }}
*/}}
{{- define "gozon.secretName" -}}
{{- default (include "gozon.fullname" .) .Values.existingSecret }}
{{- end }}

{{/*
gozon.config -- the non-secret GOZON_* settings of every process, as YAML (name -> string):
the chart's own (hosts, ports and the gateway's upstream URLs from the process table, Kafka)
then `config`.
The schema refuses the chart's own names in `config`, so nothing here is overridden by accident.
Usage: {{ include "gozon.config" . | fromYaml }}
*/}}
{{- define "gozon.config" -}}
{{- $fullname := include "gozon.fullname" . }}
{{- $env := dict }}
{{- $_ := set $env "GOZON_GATEWAY_HOST" "0.0.0.0" }}
{{- range $name, $facts := include "gozon.processTable" . | fromYaml }}
{{- $_ := set $env $facts.portSetting (toString $facts.port) }}
{{- if $facts.sidePortSetting }}
{{- $_ := set $env $facts.sidePortSetting (toString $facts.sidePort) }}
{{- end }}
{{- if eq $facts.kind "api" }}
{{- $service := upper $facts.service }}
{{- $_ := set $env (printf "GOZON_%s_API_HOST" $service) "0.0.0.0" }}
{{- /* the gateway reaches each API at its Service, on the table's port */}}
{{- $_ := set $env (printf "GOZON_GATEWAY_%s_URL" $service) (printf "http://%s-%s:%d" $fullname $name (int $facts.port)) }}
{{- end }}
{{- end }}
{{- $_ = set $env "GOZON_KAFKA_BOOTSTRAP_SERVERS" (include "gozon.kafkaBootstrap" .) }}
{{- $_ = set $env "GOZON_KAFKA_TOPIC_PARTITIONS" (toString .Values.kafka.topics.partitions) }}
{{- $_ = set $env "GOZON_KAFKA_REPLICATION_FACTOR" (toString .Values.kafka.topics.replicationFactor) }}
{{- if eq .Values.kafka.mode "strimzi" }}
{{- /* the topic operator makes the topics; a process only waits for them */}}
{{- $_ = set $env "GOZON_KAFKA_CREATE_TOPICS" "false" }}
{{- end }}
{{- range $name, $value := .Values.config }}
{{- $_ = set $env $name (toString $value) }}
{{- end }}
{{- toYaml $env }}
{{- end }}

{{/*
gozon.secretData -- the chart's Secret's data (the two database URLs under their GOZON_* names)
as YAML. `passwords` maps orders and payments to the bundled databases' passwords (unused with
external servers).
Usage: stringData: {{- include "gozon.secretData" (dict "ctx" $ "passwords" $passwords) | nindent 2 }}
*/}}
{{- define "gozon.secretData" -}}
{{- $passwords := .passwords | default dict }}
GOZON_ORDERS_DATABASE_URL: {{ include "gozon.databaseUrl" (dict "ctx" .ctx "service" "orders" "password" (get $passwords "orders")) | quote }}
GOZON_PAYMENTS_DATABASE_URL: {{ include "gozon.databaseUrl" (dict "ctx" .ctx "service" "payments" "password" (get $passwords "payments")) | quote }}
{{- end }}

{{/*
gozon.configChecksum -- sha256 of everything the processes read at start (the ConfigMap's and
the Secret's data, or the existing Secret's name): the pods' checksum/config annotation. Never
renders a database password (nor draws one).
Usage: checksum/config: {{ include "gozon.configChecksum" . }}
*/}}
{{- define "gozon.configChecksum" -}}
{{- $secret := printf "existingSecret=%s" .Values.existingSecret }}
{{- if not .Values.existingSecret }}
{{- /* A bundled database's password never changes once made: hash the URLs without it. */}}
{{- $secret = include "gozon.secretData" (dict "ctx" . "passwords" (dict "orders" "-" "payments" "-")) }}
{{- end }}
{{- print (include "gozon.config" .) $secret (toYaml .Values.otel) (toYaml .Values.common.extraEnv) | sha256sum }}
{{- end }}

{{/*
gozon.otelEnv -- the OTEL_* variables of a process or Job (none while otel.endpoint is empty);
the gateway samples new traces at otel.gatewaySampleRatio, the rest follow its decision.
Usage: {{ include "gozon.otelEnv" (dict "ctx" $ "kind" $p.kind) | nindent 12 }}
*/}}
{{- define "gozon.otelEnv" -}}
{{- if .ctx.Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .ctx.Values.otel.endpoint | quote }}
{{- if eq (.kind | default "") "gateway" }}
- name: OTEL_TRACES_SAMPLER
  value: parentbased_traceidratio
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .ctx.Values.otel.gatewaySampleRatio | toString | quote }}
{{- else }}
- name: OTEL_TRACES_SAMPLER
  value: parentbased_always_on
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "service.instance.id=$(POD_NAME),k8s.namespace.name=%s,k8s.pod.name=$(POD_NAME)" .ctx.Release.Namespace | quote }}
{{- end }}
{{- end }}

{{/*
gozon.identityEnv -- the gateway's identity settings (docs/gateway.md): the mode, and in `jwt`
mode the token checks, the HS256 key from a Secret or the JWKS file from a mounted ConfigMap.
Fails the render when `jwt` mode lacks an audience, an issuer, or exactly one key source.
Usage: {{- include "gozon.identityEnv" $ | nindent 12 }}
*/}}
{{- define "gozon.identityEnv" -}}
{{- $id := .Values.identity -}}
- name: GOZON_GATEWAY_IDENTITY
  value: {{ $id.mode | quote }}
{{- if eq $id.mode "jwt" }}
{{- if not (and $id.jwt.audience $id.jwt.issuer) }}
{{- fail "identity.mode jwt needs identity.jwt.audience and identity.jwt.issuer" }}
{{- end }}
{{- if eq (empty $id.jwt.secretName) (empty $id.jwt.jwksConfigMap) }}
{{- fail "identity.mode jwt needs exactly one of identity.jwt.secretName and identity.jwt.jwksConfigMap" }}
{{- end }}
- name: GOZON_GATEWAY_JWT_AUDIENCE
  value: {{ $id.jwt.audience | quote }}
- name: GOZON_GATEWAY_JWT_ISSUER
  value: {{ $id.jwt.issuer | quote }}
- name: GOZON_GATEWAY_JWT_LEEWAY_S
  value: {{ $id.jwt.leewaySeconds | quote }}
- name: GOZON_GATEWAY_JWT_MAX_LIFETIME_S
  value: {{ $id.jwt.maxLifetimeSeconds | quote }}
{{- if $id.jwt.secretName }}
- name: GOZON_GATEWAY_JWT_SECRET
  valueFrom:
    secretKeyRef: {name: {{ $id.jwt.secretName }}, key: GOZON_GATEWAY_JWT_SECRET}
{{- else }}
- name: GOZON_GATEWAY_JWT_JWKS_FILE
  value: /etc/gozon/jwks/jwks.json
{{- end }}
{{- end }}
{{- end }}
