{{- define "agentainer.name" -}}agentainer{{- end -}}

{{- define "agentainer.fullname" -}}
{{- if eq .Release.Name "agentainer" -}}agentainer{{- else -}}{{ printf "%s-agentainer" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "agentainer.labels" -}}
app.kubernetes.io/name: agentainer
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "agentainer.selector" -}}
app.kubernetes.io/name: agentainer
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "agentainer.redisHost" -}}{{ include "agentainer.fullname" . }}-redis{{- end -}}
