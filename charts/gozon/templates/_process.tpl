{{/*
Helpers of the gozon chart: the process table and what a Deployment of one process needs.
Every name is prefixed `gozon.` (Helm shares template names across a chart and its
subcharts); each says what it returns and how to call it. The helpers are split by topic
over the `_*.tpl` files of this folder.
*/}}

{{/*
gozon.processTable -- the facts of services/gozon/processes.py that the chart needs, as YAML:
process name -> args (of `gozon`), kind, service, port, portSetting, and for the gateway (whose
port is public) sidePort and sidePortSetting: where its /metrics is served. The chart's copy,
files/processes.yaml, is generated from the Python table (`python -m scripts.chart_process_table`;
tests/charts/test_process_table_chart.py fails when it is stale and checks the rendered
Deployments against the table). Tunables live in values (`processes.<name>`).
Usage: {{ $table := include "gozon.processTable" . | fromYaml }}
*/}}
{{- define "gozon.processTable" -}}
{{- .Files.Get "files/processes.yaml" }}
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
