{{- define "preble-router.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "preble-router.vllmName" -}}
{{- printf "%s-vllm" (include "preble-router.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Common labels; each object adds its selector labels (router or vLLM) to these. */}}
{{- define "preble-router.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* The router's pods. */}}
{{- define "preble-router.selectorLabels" -}}
app.kubernetes.io/name: preble-router
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The vLLM pods the router discovers: .Values.selector, else those of this release's vLLM Deployment. */}}
{{- define "preble-router.vllmSelectorLabels" -}}
{{- if .Values.selector -}}
{{- toYaml .Values.selector -}}
{{- else -}}
app.kubernetes.io/name: vllm
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- end -}}

{{/* The same labels as a label selector string: k1=v1,k2=v2 (sorted). */}}
{{- define "preble-router.vllmSelector" -}}
{{- $labels := include "preble-router.vllmSelectorLabels" . | fromYaml -}}
{{- $terms := list -}}
{{- range $k := keys $labels | sortAlpha -}}
{{- $terms = append $terms (printf "%s=%s" $k (get $labels $k)) -}}
{{- end -}}
{{- join "," $terms -}}
{{- end -}}

{{- define "preble-router.hfTokenEnv" -}}
{{- if .Values.hfTokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.hfTokenSecret }}
      key: HF_TOKEN
{{- end }}
- name: HF_HOME
  value: /cache/huggingface
{{- end -}}
