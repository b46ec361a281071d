{{/*
Helpers of the gozon chart: Kafka: the Strimzi cluster's names, the bootstrap address, each process's login.
Every name is prefixed `gozon.` (Helm shares template names across a chart and its
subcharts); each says what it returns and how to call it. The helpers are split by topic
over the `_*.tpl` files of this folder.
*/}}

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
{{- printf "%s-kafka-bootstrap:%d" (include "gozon.kafkaClusterName" .) (include "gozon.strimziPort" . | int) }}
{{- else }}
{{- required "kafka.external.bootstrapServers is required when kafka.mode is external" .Values.kafka.external.bootstrapServers }}
{{- end }}
{{- end }}

{{/*
gozon.strimziPort -- the port of the Strimzi Kafka's one listener: 9093 with TLS, else 9092.
Usage: {{ include "gozon.strimziPort" . | int }}
*/}}
{{- define "gozon.strimziPort" -}}
{{- ternary 9093 9092 .Values.kafka.strimzi.tls.enabled }}
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
plaintext. Strimzi mode: SCRAM-SHA-512 as the process's own KafkaUser with authentication, TLS
verified against the operator's cluster CA with tls; external mode: kafka.external's protocol
and credentials.
Usage: {{ $auth := include "gozon.kafkaAuth" (dict "ctx" $ "process" $name) | fromYaml }}
*/}}
{{- define "gozon.kafkaAuth" -}}
{{- $kafka := .ctx.Values.kafka }}
{{- if eq $kafka.mode "strimzi" }}
{{- $tls := $kafka.strimzi.tls.enabled }}
{{- if $kafka.strimzi.authentication.enabled }}
{{- $user := include "gozon.kafkaUserName" . }}
protocol: {{ ternary "SASL_SSL" "SASL_PLAINTEXT" $tls }}
mechanism: SCRAM-SHA-512
username: {{ $user }}
passwordSecret: {{ $user }}
{{- else if $tls }}
protocol: SSL
{{- end }}
{{- if $tls }}
caSecret: {{ include "gozon.kafkaClusterName" .ctx }}-cluster-ca-cert
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
{{- $ports = list (include "gozon.strimziPort" . | int) }}
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
