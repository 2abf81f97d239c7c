{{- define "agentainer.name" -}}{{ .Values.nameOverride | default "agentainer" | trunc 63 | trimSuffix "-" }}{{- end -}}

{{- define "agentainer.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{ .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else -}}
{{- $name := include "agentainer.name" . -}}
{{- if contains $name .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}
{{- end -}}

{{- define "agentainer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ .Values.serviceAccount.name | default (include "agentainer.fullname" .) }}{{- else -}}{{ required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{- define "agentainer.labels" -}}
app.kubernetes.io/name: {{ include "agentainer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "agentainer.selector" -}}
app.kubernetes.io/name: {{ include "agentainer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "agentainer.redisSelector" -}}
app.kubernetes.io/name: {{ include "agentainer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end -}}

{{- define "agentainer.redisHost" -}}{{ include "agentainer.fullname" . }}-redis{{- end -}}

{{/* The Secret with the bundled Redis's password: the user's, or the one the chart keeps. */}}
{{- define "agentainer.redisSecret" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis" (include "agentainer.fullname" .)) -}}
{{- end -}}

{{/* Rules the controller needs where it works: its resources, Events, the agents' pods, a
get (never a list) of the Secrets and ConfigMaps that Docker agents' and pooled tasks' env
names (a fresh pod's kubelet reads its own), and workflows' workspace claims. No pods/exec:
tasks go over attach. */}}
{{- define "agentainer.namespacedRules" -}}
- apiGroups: ["agentainer.dev"]
  resources: ["workflows", "agentpools"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["agentainer.dev"]
  resources: ["workflows"]
  verbs: ["delete"]  # ttlSecondsAfterFinished
- apiGroups: ["agentainer.dev"]
  resources: ["workflows/status", "agentpools/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["pods/attach"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["secrets", "configmaps"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "create", "delete"]
{{- end -}}
