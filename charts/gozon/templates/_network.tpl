{{/*
Helpers of the gozon chart: the NetworkPolicies' shared egress rules.
Every name is prefixed `gozon.` (Helm shares template names across a chart and its
subcharts); each says what it returns and how to call it. The helpers are split by topic
over the `_*.tpl` files of this folder.
*/}}

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
