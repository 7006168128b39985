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

{{/* The agent's state Secret (agent.stateSecret). */}}
{{- define "envoy.agentStateSecret" -}}
{{- .Values.agent.stateSecret.name | default (printf "%s-agent-state" (include "envoy.fullname" .)) -}}
{{- end -}}

{{/* The Secret holding the join token: agent.tokenSecret, or the chart's own. */}}
{{- define "envoy.agentTokenSecret" -}}
{{- .Values.agent.tokenSecret | default (printf "%s-agent-token" (include "envoy.fullname" .)) -}}
{{- end -}}

{{/* The agent's ServiceAccount (only with agent.stateSecret). */}}
{{- define "envoy.agentServiceAccount" -}}
{{- printf "%s-agent" (include "envoy.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
One agent container (init: `atlasd agent --once`; sidecar: `atlasd agent`). Every setting
is an environment variable `atlasd agent` reads; the token comes from its Secret only
(optional: once enrolled, a pod restores from the state Secret and needs none).
*/}}
{{- define "envoy.agentContainer" -}}
{{- $a := .root.Values.agent -}}
{{- if not $a.cluster }}{{ fail "agent.enabled: set agent.cluster (atlasd writes it into <cluster>-envoy-values)" }}{{ end -}}
{{- if not $a.server }}{{ fail "agent.enabled: set agent.server, HOST:PORT of atlasd's enrollment endpoint" }}{{ end -}}
name: {{ .name }}
image: "{{ $a.image.repository }}:{{ $a.image.tag }}"
imagePullPolicy: {{ $a.image.pullPolicy }}
command:
  - atlasd
args:
  - agent
  {{- if .once }}
  - --once
  {{- end }}
env:
  - name: ATLAS_CLUSTER
    value: {{ $a.cluster | quote }}
  - name: NAMESPACE
    value: {{ $a.namespace | quote }}
  - name: ATLAS_ENROLL_SERVER
    value: {{ $a.server | quote }}
  {{- with $a.serverName }}
  - name: ATLAS_ENROLL_SERVER_NAME
    value: {{ . | quote }}
  {{- end }}
  - name: ATLAS_CERT_DIR
    value: {{ $a.certDir | quote }}
  - name: ATLAS_BUNDLE_INTERVAL
    value: {{ $a.bundleInterval | quote }}
  - name: ATLAS_LOG_FORMAT
    value: {{ $a.logFormat | quote }}
  - name: ATLAS_JOIN_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ include "envoy.agentTokenSecret" .root }}
        key: token
        optional: true
  {{- if $a.stateSecret.enabled }}
  - name: ATLAS_STATE_SECRET
    value: {{ include "envoy.agentStateSecret" .root | quote }}
  - name: ATLAS_STATE_NAMESPACE
    valueFrom:
      fieldRef:
        fieldPath: metadata.namespace
  {{- end }}
{{- with $a.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $a.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumeMounts:
  - name: agent-certs
    mountPath: {{ $a.certDir }}
  # Python needs a writable temporary directory (the root filesystem is read-only).
  - name: agent-tmp
    mountPath: /tmp
  {{- if $a.stateSecret.enabled }}
  - name: agent-kube-api
    mountPath: /var/run/secrets/kubernetes.io/serviceaccount
    readOnly: true
  {{- end }}
{{- end -}}
