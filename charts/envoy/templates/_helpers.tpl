{{/* Chart name (default "envoy"; the pod label app=<name> is what atlasd selects by). */}}
{{- define "envoy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: the release name when it already contains the chart name. */}}
{{- define "envoy.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "envoy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Selector labels. They keep the original chart's `app` and `release` labels: atlasd's
default envoy selector is `app=envoy,release=atlas` (the observability Envoy installed
as release "atlas"), and the alertmanager<i> Services select the same pair.
*/}}
{{- define "envoy.selectorLabels" -}}
app: {{ include "envoy.name" . }}
release: {{ .Release.Name }}
{{- end -}}

{{- define "envoy.labels" -}}
{{ include "envoy.selectorLabels" . }}
chart: {{ include "envoy.chart" . }}
heritage: {{ .Release.Service }}
app.kubernetes.io/name: {{ include "envoy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
