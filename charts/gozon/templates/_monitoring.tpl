{{/*
Helpers of the gozon chart: the Prometheus Operator objects' labels and switch.
Every name is prefixed `gozon.` (Helm shares template names across a chart and its
subcharts); each says what it returns and how to call it. The helpers are split by topic
over the `_*.tpl` files of this folder.
*/}}

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
