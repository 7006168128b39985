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

{{/*
The admin interface's port on the loopback: probes.adminPort, else what the bootstrap
atlasd wrote says (files."envoy.yaml": admin.address.socket_address.port_value).
*/}}
{{- define "envoy.adminPort" -}}
{{- $port := int .Values.probes.adminPort -}}
{{- if not $port -}}
{{- $boot := fromYaml (index (.Values.files | default dict) "envoy.yaml" | default "") -}}
{{- $port = int (dig "admin" "address" "socket_address" "port_value" 0 $boot) -}}
{{- end -}}
{{- if not $port -}}
{{- fail "probes.enabled: files.envoy.yaml has no admin.address.socket_address.port_value; set probes.adminPort (or probes.enabled=false and probes of your own)" -}}
{{- end -}}
{{- $port -}}
{{- end -}}

{{/*
The probe listener, merged over the bootstrap by `--config-yaml` (repeated fields are
appended): GET /ready is proxied to admin's /ready on the loopback, anything else gets a
404, so admin (which can stop or reconfigure Envoy) stays unreachable from outside the pod.
The names cannot clash with what atlasd serves over xDS (static and dynamic names share
one namespace per type).
*/}}
{{- define "envoy.probeBootstrap" -}}
{{- $admin := include "envoy.adminPort" . -}}
static_resources:
  listeners:
    - name: envoy-chart-probe
      address:
        socket_address:
          address: {{ .Values.probes.address | quote }}
          port_value: {{ .Values.probes.port }}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: envoy-chart-probe
                route_config:
                  name: envoy-chart-probe
                  virtual_hosts:
                    - name: probe
                      domains: ["*"]
                      routes:
                        - match:
                            path: /ready
                            headers:
                              - name: ":method"
                                string_match: {exact: GET}
                          route: {cluster: envoy-chart-probe-admin, timeout: 5s}
                        - match: {prefix: /}
                          direct_response: {status: 404}
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: envoy-chart-probe-admin
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: envoy-chart-probe-admin
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {address: 127.0.0.1, port_value: {{ $admin }}}
{{- end -}}

{{/* One default probe (GET /ready on the probe listener) with the given timings. */}}
{{- define "envoy.probe" -}}
{{- $timings := index .root.Values.probes .kind -}}
{{- $probe := dict "httpGet" (dict "path" "/ready" "port" "probe") -}}
{{- toYaml (merge $probe $timings) -}}
{{- end -}}
