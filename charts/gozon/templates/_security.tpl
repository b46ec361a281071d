{{/*
Helpers of the gozon chart: the pods' and containers' security contexts.
Every name is prefixed `gozon.` (Helm shares template names across a chart and its
subcharts); each says what it returns and how to call it. The helpers are split by topic
over the `_*.tpl` files of this folder.
*/}}

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
