{{/* Names, labels and the pieces shared by several templates. */}}

{{- define "shipyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "shipyard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "shipyard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "shipyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shipyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "shipyard.labels" -}}
helm.sh/chart: {{ include "shipyard.chart" . }}
{{ include "shipyard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: shipyard
{{- end }}

{{- define "shipyard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "shipyard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "shipyard.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Peering is on when asked for, and always with more than one replica (distinct priorities per pod). */}}
{{- define "shipyard.peering" -}}
{{- if or .Values.peering.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{/*
The operator's permissions, defined once. "cluster" rules exist only cluster-wide (a ClusterRole in either mode);
"namespaced" rules go into the ClusterRole (all namespaces) or into a Role in each watched namespace.
Everything here is derived from shipyard.operator.kube and shipyard.operator.handlers and proven by tests/integration/test_chart.py,
which runs the operator authenticated as this ServiceAccount.
*/}}
{{- define "shipyard.rules.namespaced" -}}
# ModelDeployments: Kopf lists and watches them; the operator writes only their status.
- apiGroups: [shipyard.dev]
  resources: [modeldeployments]
  verbs: [list, watch]
- apiGroups: [shipyard.dev]
  resources: [modeldeployments/status]
  verbs: [patch]
# Children, server-side applied by field manager shipyard-operator (apply creates them), scaled, deleted.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, create, patch, delete]
# One PodDisruptionBudget per live version (spec.serving.disruptionBudget), deleted with its version's replicas.
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [list, watch, create, patch, delete]
# The scaler of spec.serving.autoscaling: a HorizontalPodAutoscaler or a KEDA ScaledObject (when KEDA is installed).
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: [list, watch, create, patch, delete]
# spec.rollout.traffic.gatewayAPI: the routes whose rules Shipyard sets (read; server-side apply of spec.rules only),
# and the Gateways they attach to (read: Programmed). list: whether the Gateway API is installed at all.
- apiGroups: [gateway.networking.k8s.io]
  resources: [httproutes, grpcroutes]
  verbs: [get, list, patch]
- apiGroups: [gateway.networking.k8s.io]
  resources: [gateways]
  verbs: [get]
# Pods of the children: readiness, scrape targets, compression summaries (termination messages).
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# The compression artifacts volume must exist before a Job is created.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get]
# Events on ModelDeployments (the operator's and Kopf's own warnings).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# The Namespace's shipyard.dev/allowed-prometheus-addresses annotation (docs/security.md). Read-only, get only; in a
# Role it grants reading that one namespace (a request for a Namespace object is authorized in its own namespace).
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get]
{{- if include "shipyard.peering" . }}
{{- if .Values.watchNamespaces }}
# Kopf peering (active/standby): one KopfPeering per watched namespace.
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [list, watch, patch]
{{- end }}
{{- end }}
{{- end }}

{{- define "shipyard.rules.cluster" -}}
# Kopf follows CRDs (it serves resources as they appear) ...
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- if .Values.watchNamespaces }}
# ... and, when restricted to namespaces, the namespaces themselves.
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- else if include "shipyard.peering" . }}
# Kopf peering (active/standby), cluster-wide.
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [list, watch, patch]
{{- end }}
{{- end }}
