{{- define "atlasd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: the release name when it already contains the chart name. */}}
{{- define "atlasd.fullname" -}}
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

{{- define "atlasd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "atlasd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "atlasd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "atlasd.labels" -}}
{{ include "atlasd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: atlasd
helm.sh/chart: {{ include "atlasd.chart" . }}
{{- end -}}

{{- define "atlasd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "atlasd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The headless ADS Service: one address per Ready replica. */}}
{{- define "atlasd.adsHeadlessName" -}}
{{- printf "%s-ads" (include "atlasd.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The ADS Service's in-cluster name: where the observability Envoy reaches atlasd (the
headless one unless ads.headless is false). */}}
{{- define "atlasd.adsHost" -}}
{{- $name := ternary (include "atlasd.adsHeadlessName" .) (include "atlasd.fullname" .) (.Values.ads.headless | default false) -}}
{{- printf "%s.%s.svc.%s" $name .Release.Namespace .Values.atlas.clusterDomain -}}
{{- end -}}

{{/* The forwarder token's Secret: the user's, or the one this chart generates. */}}
{{- define "atlasd.forwarderTokenSecret" -}}
{{- .Values.atlas.forwarderTokenSecret | default (printf "%s-forwarder-token" (include "atlasd.fullname" .) | trunc 63 | trimSuffix "-") -}}
{{- end -}}

{{- define "atlasd.dnsServiceName" -}}
{{- printf "%s-dns" (include "atlasd.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "atlasd.corefileConfigMap" -}}
{{- printf "%s-corefile" (include "atlasd.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The Corefile: `coredns.corefile` if set, else the chart's files/Corefile (owned by the
DNS module; it reads {$DNS_PORT} and {$ZONE_FILE} from the coredns container's env).
*/}}
{{- define "atlasd.corefile" -}}
{{- if .Values.coredns.corefile -}}
{{- .Values.coredns.corefile -}}
{{- else -}}
{{- required "charts/atlasd/files/Corefile is missing (or set coredns.corefile)" (.Files.Get "files/Corefile") -}}
{{- end -}}
{{- end -}}

{{/*
The Role's rules: exactly what atlasd calls in its own namespace, i.e.
atlasd.kube.resources.REQUIRED_PERMISSIONS (a test compares the two both ways).
*/}}
{{- define "atlasd.rules" -}}
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch", "list"]
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "create", "update"]
{{- end -}}
