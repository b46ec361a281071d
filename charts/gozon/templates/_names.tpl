{{/*
Helpers of the gozon chart: names, labels and the image: what every object is called and labelled.
Every name is prefixed `gozon.` (Helm shares template names across a chart and its
subcharts); each says what it returns and how to call it. The helpers are split by topic
over the `_*.tpl` files of this folder.
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
