{{- define "fledge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fledge.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "fledge.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "fledge.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "fledge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fledge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fledge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "fledge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "fledge.serviceAccountName" -}}
{{- default (include "fledge.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{/* The Secret the pods mount: the chart's own, cert-manager's, or the user's. */}}
{{- define "fledge.tlsSecretName" -}}
{{- if eq .Values.certificates.mode "secret" }}
{{- .Values.certificates.secret.name }}
{{- else }}
{{- printf "%s-tls" (include "fledge.fullname" .) }}
{{- end }}
{{- end }}

{{/* The names the serving certificate is for: the Service's in-cluster DNS names. */}}
{{- define "fledge.dnsNames" -}}
{{- $svc := include "fledge.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) | toJson }}
{{- end }}

{{/*
What both webhook entries share: the same endpoint, called the same way. Takes
(dict "root" $ "caBundle" $caBundle).
*/}}
{{- define "fledge.webhookCall" -}}
{{- $root := .root -}}
admissionReviewVersions: ["v1"]
# The decision only reads the request: dry runs and retries are safe.
sideEffects: None
failurePolicy: {{ $root.Values.webhook.failurePolicy }}
# The decision is idempotent on its own output.
reinvocationPolicy: IfNeeded
matchPolicy: Equivalent
timeoutSeconds: 5
rules:
  - apiGroups: ["apps"]
    apiVersions: ["v1"]
    resources: ["deployments"]
    operations: ["CREATE", "UPDATE"]
    scope: Namespaced
clientConfig:
  service:
    name: {{ include "fledge.fullname" $root }}
    namespace: {{ $root.Release.Namespace }}
    path: /mutate
    port: {{ $root.Values.service.port }}
  {{- with .caBundle }}
  caBundle: {{ . }}
  {{- end }}
{{- end }}

{{/* Never fledge's own namespace (its pods must start while the webhook is down) nor kube-system. */}}
{{- define "fledge.webhookExcludedNamespaces" -}}
- key: kubernetes.io/metadata.name
  operator: NotIn
  values: [{{ .Release.Namespace | quote }}, "kube-system"]
{{- end }}
