{{/*
Helpers of the gozon chart. Every name is prefixed `gozon.` (Helm shares template names
across a chart and its subcharts); each says what it returns and how to call it.
*/}}

{{/*
gozon.name -- the chart's name, or nameOverride; at most 63 characters (a DNS label).
Usage: {{ include "gozon.name" . }}
*/}}
{{- define "gozon.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
gozon.fullname -- the prefix of every resource name: fullnameOverride, else `<release>-<name>`
(just `<release>` when the release name already contains the chart name). 40 characters at most,
so that `<fullname>-payments-consumer` and Strimzi's derived names stay valid DNS labels.
Usage: {{ include "gozon.fullname" . }}
*/}}
{{- define "gozon.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
gozon.chart -- `<chart>-<version>` for the helm.sh/chart label.
Usage: {{ include "gozon.chart" . }}
*/}}
{{- define "gozon.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
gozon.selectorLabels -- the labels that select one component's pods (never change on upgrade:
a Deployment's selector is immutable).
Usage: {{ include "gozon.selectorLabels" (dict "ctx" $ "component" "orders-api") }}
*/}}
{{- define "gozon.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gozon.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
gozon.labels -- the standard app.kubernetes.io/* labels of one component's objects.
Usage: {{ include "gozon.labels" (dict "ctx" $ "component" "orders-api") }}
*/}}
{{- define "gozon.labels" -}}
helm.sh/chart: {{ include "gozon.chart" .ctx }}
{{ include "gozon.selectorLabels" . }}
app.kubernetes.io/part-of: gozon
app.kubernetes.io/version: {{ include "gozon.imageTag" .ctx | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{/*
gozon.imageTag -- image.tag, else the chart's appVersion. `latest` is refused by the schema.
Usage: {{ include "gozon.imageTag" . }}
*/}}
{{- define "gozon.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/*
gozon.image -- the one image reference, `repository:tag`.
Usage: image: {{ include "gozon.image" . }}
*/}}
{{- define "gozon.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "gozon.imageTag" .) | quote }}
{{- end }}

{{/*
gozon.serviceAccountName -- the ServiceAccount the pods run as.
Usage: serviceAccountName: {{ include "gozon.serviceAccountName" . }}
*/}}
{{- define "gozon.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gozon.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
gozon.processTable -- the facts of services/gozon/processes.py that the chart needs, as YAML:
process name -> args (of `gozon`), kind, service, port, portSetting, and for the gateway (whose
port is public) sidePort and sidePortSetting: where its /metrics is served. Tunables live in values
(`processes.<name>`); tests/charts/test_process_table_chart.py renders the chart and checks its
Deployments against the Python table, so the two cannot drift apart.
Usage: {{ $table := include "gozon.processTable" . | fromYaml }}
*/}}
{{- define "gozon.processTable" -}}
gateway:
  args: [gateway]
  kind: gateway
  service: ""
  port: 8080
  portSetting: GOZON_GATEWAY_PORT
  sidePort: 9105
  sidePortSetting: GOZON_GATEWAY_METRICS_PORT
orders-api:
  args: [orders, api]
  kind: api
  service: orders
  port: 8081
  portSetting: GOZON_ORDERS_API_PORT
orders-relay:
  args: [orders, relay]
  kind: relay
  service: orders
  port: 9101
  portSetting: GOZON_ORDERS_RELAY_METRICS_PORT
orders-consumer:
  args: [orders, consumer]
  kind: consumer
  service: orders
  port: 9102
  portSetting: GOZON_ORDERS_CONSUMER_METRICS_PORT
payments-api:
  args: [payments, api]
  kind: api
  service: payments
  port: 8082
  portSetting: GOZON_PAYMENTS_API_PORT
payments-relay:
  args: [payments, relay]
  kind: relay
  service: payments
  port: 9103
  portSetting: GOZON_PAYMENTS_RELAY_METRICS_PORT
payments-consumer:
  args: [payments, consumer]
  kind: consumer
  service: payments
  port: 9104
  portSetting: GOZON_PAYMENTS_CONSUMER_METRICS_PORT
{{- end }}

{{/*
gozon.process -- one process's facts merged with its values: the dict a Deployment is built from,
with `portName` (its port's name: http or metrics) and `metricsPortName` (the port serving its
/metrics: the side port `metrics` when it has one). Fails with the known names when `name` is not
in the table.
Usage: {{ $p := include "gozon.process" (dict "ctx" $ "name" "orders-api") | fromYaml }}
*/}}
{{- define "gozon.process" -}}
{{- $table := include "gozon.processTable" .ctx | fromYaml }}
{{- if not (hasKey $table .name) }}
{{- fail (printf "processes.%s: no such process (known: %s)" .name (keys $table | sortAlpha | join ", ")) }}
{{- end }}
{{- $facts := get $table .name }}
{{- $values := get .ctx.Values.processes .name | default dict }}
{{- $port := ternary "http" "metrics" (has $facts.kind (list "gateway" "api")) }}
{{- $metricsPort := ternary "metrics" $port (hasKey $facts "sidePort") }}
{{- toYaml (merge (dict "name" .name "portName" $port "metricsPortName" $metricsPort) $facts (deepCopy $values)) }}
{{- end }}

{{/*
gozon.servesHttp -- "true" for the processes with a Service (the gateway and the APIs).
Usage: {{ if eq (include "gozon.servesHttp" $p) "true" }}
*/}}
{{- define "gozon.servesHttp" -}}
{{- has .kind (list "gateway" "api") }}
{{- end }}

{{/*
gozon.maxReplicas -- a process's HPA maximum; a consumer's is capped at kafka.topics.partitions
(a consumer group never uses more members than the topic has partitions).
Usage: {{ include "gozon.maxReplicas" (dict "ctx" $ "process" $p) }}
*/}}
{{- define "gozon.maxReplicas" -}}
{{- $max := int .process.autoscaling.maxReplicas }}
{{- if eq .process.kind "consumer" }}
{{- $max = min $max (int .ctx.Values.kafka.topics.partitions) }}
{{- end }}
{{- $max }}
{{- end }}

{{/*
gozon.kafkaClusterName -- the Strimzi Kafka resource's name (Strimzi derives its Services from it).
Usage: {{ include "gozon.kafkaClusterName" . }}
*/}}
{{- define "gozon.kafkaClusterName" -}}
{{- include "gozon.fullname" . }}
{{- end }}

{{/*
gozon.kafkaBootstrap -- GOZON_KAFKA_BOOTSTRAP_SERVERS: Strimzi's bootstrap Service, or the
external address (required in external mode).
Usage: {{ include "gozon.kafkaBootstrap" . }}
*/}}
{{- define "gozon.kafkaBootstrap" -}}
{{- if eq .Values.kafka.mode "strimzi" }}
{{- printf "%s-kafka-bootstrap:9092" (include "gozon.kafkaClusterName" .) }}
{{- else }}
{{- required "kafka.external.bootstrapServers is required when kafka.mode is external" .Values.kafka.external.bootstrapServers }}
{{- end }}
{{- end }}

{{/*
gozon.kafkaUserName -- the Strimzi KafkaUser of a relay or consumer (`<cluster>-<process>`),
which is also its SCRAM user name and the name of the Secret holding its password.
Usage: {{ include "gozon.kafkaUserName" (dict "ctx" $ "process" "orders-relay") }}
*/}}
{{- define "gozon.kafkaUserName" -}}
{{- printf "%s-%s" (include "gozon.kafkaClusterName" .ctx) .process }}
{{- end }}

{{/*
gozon.kafkaAuth -- how a process that uses Kafka logs in, as YAML: `protocol`, `mechanism`,
`username`, `passwordSecret` (key `password`) and `caSecret` (key `ca.crt`), or {} for
plaintext. Strimzi mode with authentication: SCRAM-SHA-512 as the process's own KafkaUser;
external mode: kafka.external's protocol and credentials.
Usage: {{ $auth := include "gozon.kafkaAuth" (dict "ctx" $ "process" $name) | fromYaml }}
*/}}
{{- define "gozon.kafkaAuth" -}}
{{- $kafka := .ctx.Values.kafka }}
{{- if eq $kafka.mode "strimzi" }}
{{- if $kafka.strimzi.authentication.enabled }}
{{- $user := include "gozon.kafkaUserName" . }}
protocol: SASL_PLAINTEXT
mechanism: SCRAM-SHA-512
username: {{ $user }}
passwordSecret: {{ $user }}
{{- end }}
{{- else if ne $kafka.external.securityProtocol "PLAINTEXT" }}
{{- $e := $kafka.external }}
protocol: {{ $e.securityProtocol }}
{{- if hasPrefix "SASL_" $e.securityProtocol }}
mechanism: {{ $e.saslMechanism }}
username: {{ required "kafka.external.username is required with SASL" $e.username | quote }}
passwordSecret: {{ required "kafka.external.passwordSecret is required with SASL" $e.passwordSecret }}
{{- end }}
{{- with $e.caSecret }}
caSecret: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/*
gozon.kafkaPorts -- the broker ports the NetworkPolicies open, as a YAML list of integers.
Usage: {{ range include "gozon.kafkaPorts" . | fromYamlArray }}
*/}}
{{- define "gozon.kafkaPorts" -}}
{{- $ports := list }}
{{- if eq .Values.kafka.mode "strimzi" }}
{{- $ports = list 9092 }}
{{- else }}
{{- range splitList "," (include "gozon.kafkaBootstrap" .) }}
{{- $hostPort := splitList ":" (trim .) }}
{{- if ne (len $hostPort) 2 }}
{{- fail (printf "kafka.external.bootstrapServers: %q is not host:port" (trim .)) }}
{{- end }}
{{- $ports = append $ports (last $hostPort | int) }}
{{- end }}
{{- end }}
{{- toYaml ($ports | uniq) }}
{{- end }}

{{/*
gozon.dbName -- the name of a bundled database's StatefulSet, Service and Secret
(`<fullname>-orders-db`, `<fullname>-payments-db`: the spec's orders-db and payments-db).
Usage: {{ include "gozon.dbName" (dict "ctx" $ "service" "orders") }}
*/}}
{{- define "gozon.dbName" -}}
{{- printf "%s-%s-db" (include "gozon.fullname" .ctx) .service }}
{{- end }}

{{/*
gozon.dbDatabase -- the database name of a service, as the spec has it.
Usage: {{ include "gozon.dbDatabase" "orders" }}
*/}}
{{- define "gozon.dbDatabase" -}}
{{- ternary "order_db" "account_db" (eq . "orders") }}
{{- end }}

{{/*
gozon.dbPassword -- a bundled database's password: the one in its existing Secret (so upgrades
keep it), else a new random one. Each call without an existing Secret draws a new password:
call it once per render (secret.yaml does) and pass the result on.
Usage: {{ $password := include "gozon.dbPassword" (dict "ctx" $ "service" "orders") }}
*/}}
{{- define "gozon.dbPassword" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace (include "gozon.dbName" .) }}
{{- if and $existing $existing.data (hasKey $existing.data "password") }}
{{- index $existing.data "password" | b64dec }}
{{- else }}
{{- randAlphaNum 32 }}
{{- end }}
{{- end }}

{{/*
gozon.databaseUrl -- GOZON_ORDERS_DATABASE_URL or GOZON_PAYMENTS_DATABASE_URL: the bundled
database's (with the `password` given) or postgresql.external.<service>'s (password URL-escaped).
Usage: {{ include "gozon.databaseUrl" (dict "ctx" $ "service" "orders" "password" $password) }}
*/}}
{{- define "gozon.databaseUrl" -}}
{{- $pg := .ctx.Values.postgresql }}
{{- if eq $pg.mode "bundled" }}
{{- printf "postgresql+asyncpg://%s:%s@%s:5432/%s" $pg.bundled.user .password (include "gozon.dbName" .) (include "gozon.dbDatabase" .service) }}
{{- else }}
{{- $db := get $pg.external .service }}
{{- $host := required (printf "postgresql.external.%s.host is required when postgresql.mode is external (or set existingSecret)" .service) $db.host }}
{{- $password := required (printf "postgresql.external.%s.password is required when postgresql.mode is external and existingSecret is empty" .service) $db.password }}
{{- $url := printf "postgresql+asyncpg://%s:%s@%s:%d/%s" (urlquery $db.user) (urlquery $password) $host (int $db.port) $db.database }}
{{- if $db.params }}{{ $url = printf "%s?%s" $url $db.params }}{{ end }}
{{- $url }}
{{- end }}
{{- end }}

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
the chart's own (hosts, ports from the process table, upstream URLs, Kafka) then `config`.
The schema refuses the chart's own names in `config`, so nothing here is overridden by accident.
Usage: {{ include "gozon.config" . | fromYaml }}
*/}}
{{- define "gozon.config" -}}
{{- $fullname := include "gozon.fullname" . }}
{{- $env := dict }}
{{- range $name, $facts := include "gozon.processTable" . | fromYaml }}
{{- $_ := set $env $facts.portSetting (toString $facts.port) }}
{{- if $facts.sidePortSetting }}
{{- $_ := set $env $facts.sidePortSetting (toString $facts.sidePort) }}
{{- end }}
{{- end }}
{{- $_ := set $env "GOZON_GATEWAY_HOST" "0.0.0.0" }}
{{- $_ = set $env "GOZON_ORDERS_API_HOST" "0.0.0.0" }}
{{- $_ = set $env "GOZON_PAYMENTS_API_HOST" "0.0.0.0" }}
{{- $_ = set $env "GOZON_GATEWAY_ORDERS_URL" (printf "http://%s-orders-api:8081" $fullname) }}
{{- $_ = set $env "GOZON_GATEWAY_PAYMENTS_URL" (printf "http://%s-payments-api:8082" $fullname) }}
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
gozon.otelPort -- the port of otel.endpoint (its explicit port, else 443 for https, 80 for http).
Usage: {{ include "gozon.otelPort" . }}
*/}}
{{- define "gozon.otelPort" -}}
{{- $url := urlParse .Values.otel.endpoint }}
{{- $hostPort := splitList ":" $url.host }}
{{- if eq (len $hostPort) 2 }}{{ last $hostPort }}{{ else if eq $url.scheme "https" }}443{{ else }}80{{ end }}
{{- end }}

{{/*
gozon.monitorLabels -- the labels of a ServiceMonitor, PodMonitor or PrometheusRule: the chart's,
`release: <metrics.prometheusRelease>` (what kube-prometheus-stack's Prometheus selects) unless
the object's own `labels` value names a release, then that value.
Usage: {{- include "gozon.monitorLabels" (dict "ctx" $ "labels" .Values.metrics.podMonitor.labels) | nindent 4 }}
*/}}
{{- define "gozon.monitorLabels" -}}
{{ include "gozon.labels" (dict "ctx" .ctx "component" "metrics") }}
{{- $own := .labels | default dict }}
{{- with .ctx.Values.metrics.prometheusRelease }}
{{- if not (hasKey $own "release") }}
release: {{ . | quote }}
{{- end }}
{{- end }}
{{- with $own }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
gozon.monitoringOn -- "true" when a metrics object is on: `true`, or `auto` and the cluster
serves monitoring.coreos.com/v1 (the Prometheus Operator's CRDs).
Usage: {{ if eq (include "gozon.monitoringOn" (dict "ctx" $ "enabled" .Values.metrics.serviceMonitor.enabled)) "true" }}
*/}}
{{- define "gozon.monitoringOn" -}}
{{- if eq (toString .enabled) "auto" }}
{{- .ctx.Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}
{{- else }}
{{- eq (toString .enabled) "true" }}
{{- end }}
{{- end }}

{{/*
gozon.podSecurityContext -- every pod's securityContext: a non-root numeric user and group
(common.podSecurityContext) and the runtime's seccomp profile. With gozon.securityContext
(read-only root filesystem, no privilege escalation, every capability dropped) it is not a
value: nothing the platform does needs more.
Usage: securityContext: {{- include "gozon.podSecurityContext" . | nindent 8 }}
*/}}
{{- define "gozon.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.common.podSecurityContext.runAsUser }}
runAsGroup: {{ .Values.common.podSecurityContext.runAsGroup }}
fsGroup: {{ .Values.common.podSecurityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
gozon.securityContext -- every container's securityContext: read-only root filesystem, no
privilege escalation, not privileged, every capability dropped.
Usage: securityContext: {{- include "gozon.securityContext" . | nindent 12 }}
*/}}
{{- define "gozon.securityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
privileged: false
capabilities:
  drop: [ALL]
{{- end }}

{{/*
gozon.podScheduling -- nodeSelector, tolerations, affinity, priority class and, for a
Deployment (`spread` true), the topology spread of one component's pods.
Usage: {{- include "gozon.podScheduling" (dict "ctx" $ "component" "orders-api" "spread" true) | nindent 6 }}
*/}}
{{- define "gozon.podScheduling" -}}
{{- $common := .ctx.Values.common }}
{{- with $common.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $common.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $common.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $common.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- if and .spread $common.topologySpread }}
topologySpreadConstraints:
  {{- range $common.topologySpread }}
  - maxSkew: {{ .maxSkew }}
    topologyKey: {{ .topologyKey }}
    whenUnsatisfiable: {{ .whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "gozon.selectorLabels" (dict "ctx" $.ctx "component" $.component) | nindent 8 }}
    matchLabelKeys: [pod-template-hash]
  {{- end }}
{{- end }}
{{- end }}

{{/*
gozon.egressDnsOtlp -- NetworkPolicy egress rules every pod of the release gets: the cluster
DNS (53/UDP and TCP) and, when otel.endpoint is set, the OTLP collector's port.
Usage: egress: {{- include "gozon.egressDnsOtlp" $ | nindent 4 }}
*/}}
{{- define "gozon.egressDnsOtlp" -}}
- to:
    - namespaceSelector:
        {{- toYaml .Values.networkPolicy.dns.namespaceSelector | nindent 8 }}
      podSelector:
        {{- toYaml .Values.networkPolicy.dns.podSelector | nindent 8 }}
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- if .Values.otel.endpoint }}
- ports:
    - port: {{ include "gozon.otelPort" . }}
      protocol: TCP
  {{- with .Values.otel.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
gozon.egressDatabase -- the NetworkPolicy egress rule to one service's database: the bundled
StatefulSet's pods, or the external server's port (to networkPolicy.postgresqlTo when given).
Usage: {{- include "gozon.egressDatabase" (dict "ctx" $ "service" "orders") | nindent 4 }}
*/}}
{{- define "gozon.egressDatabase" -}}
{{- if eq .ctx.Values.postgresql.mode "bundled" }}
- to:
    - podSelector:
        matchLabels:
          {{- include "gozon.selectorLabels" (dict "ctx" .ctx "component" (printf "%s-db" .service)) | nindent 10 }}
  ports:
    - port: 5432
      protocol: TCP
{{- else }}
- ports:
    - port: {{ (get .ctx.Values.postgresql.external .service).port }}
      protocol: TCP
  {{- with .ctx.Values.networkPolicy.postgresqlTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
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
