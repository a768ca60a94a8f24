{{/* Names, labels and the pieces several templates share. */}}

{{- define "cachefs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cachefs.fullname" -}}
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

{{- define "cachefs.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "cachefs.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "cachefs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cachefs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "cachefs.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cachefs.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cachefs.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The headless Service the nodes find each other through. */}}
{{- define "cachefs.peersService" -}}
{{- printf "%s-peers" (include "cachefs.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cachefs.tokenSecretName" -}}
{{- default (printf "%s-token" (include "cachefs.fullname" .)) .Values.peerToken.existingSecret }}
{{- end }}

{{- define "cachefs.tokenSecretKey" -}}
{{- if .Values.peerToken.existingSecret }}{{ .Values.peerToken.key }}{{ else }}token{{ end }}
{{- end }}

{{/* The CSI driver's name: fixed, the plugin reports it in GetPluginInfo. */}}
{{- define "cachefs.driverName" -}}csi.cachefs.dev{{- end }}

{{- define "cachefs.pluginDir" -}}
{{- printf "%s/plugins/%s" .Values.kubeletDir (include "cachefs.driverName" .) }}
{{- end }}

{{/* Whether the node calls the Kubernetes API (membership, Node labels, models). */}}
{{- define "cachefs.membership" -}}
{{- (.Values.config.cluster | default dict).membership | default "kubernetes" }}
{{- end }}

{{- define "cachefs.labelsNodes" -}}
{{- if (.Values.config.cluster | default dict).label_node }}true{{ end }}
{{- end }}

{{- define "cachefs.reconcilesModels" -}}
{{- if (.Values.config.models | default dict).enabled }}true{{ end }}
{{- end }}

{{/* Whether the node must change a group owner (cache root or socket): CAP_CHOWN. */}}
{{- define "cachefs.needsChown" -}}
{{- if or .Values.config.group ((.Values.config.server | default dict).socket_group) }}true{{ end }}
{{- end }}

{{/* A cachefs size ("16GiB", "40G") as a Kubernetes quantity ("16Gi", "40G"). */}}
{{- define "cachefs.quantity" -}}
{{- $size := toString . | trim }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $size }}
{{- $unit := lower (trim (trimPrefix $number $size)) }}
{{- $units := dict "" "" "b" "" "k" "k" "kb" "k" "m" "M" "mb" "M" "g" "G" "gb" "G" "t" "T" "tb" "T" "ki" "Ki" "kib" "Ki" "mi" "Mi" "mib" "Mi" "gi" "Gi" "gib" "Gi" "ti" "Ti" "tib" "Ti" }}
{{- printf "%s%s" $number (get $units $unit) }}
{{- end }}

{{/* Container paths: the same in every container that mounts them. */}}
{{- define "cachefs.cacheRoot" -}}/var/cache/cachefs{{- end }}
{{- define "cachefs.configDir" -}}/etc/cachefs{{- end }}
{{- define "cachefs.tokenDir" -}}/var/run/secrets/cachefs{{- end }}
{{- define "cachefs.socketPath" -}}/run/cachefs/cachefs.sock{{- end }}
{{- define "cachefs.csiStatePath" -}}/var/lib/cachefs/csi{{- end }}

{{/* The node's config file, built from the values. */}}
{{- define "cachefs.config" -}}
{{- $root := include "cachefs.cacheRoot" . }}
{{- $config := deepCopy (omit .Values.config "server" "cluster" "csi" "policy" "models") }}
{{- /* The chart's own component (the CSI plugin) holds the cluster token. */}}
{{- $policy := list (dict "callers" (list "cluster") "allow" (list "all")) }}
{{- $_ := set $config "policy" (concat $policy (.Values.config.policy | default list)) }}
{{- $tiers := list }}
{{- $memory := .Values.cache.memory }}
{{- if $memory.enabled }}
{{- $tiers = append $tiers (dict "name" "memory" "medium" "memory" "path" (printf "%s/memory" $root) "quota" $memory.quota) }}
{{- end }}
{{- $disk := dict "name" "disk" "medium" "disk" "path" (printf "%s/disk" $root) }}
{{- if .Values.cache.disk.quota }}
{{- $_ := set $disk "quota" .Values.cache.disk.quota }}
{{- end }}
{{- $tiers = append $tiers $disk }}
{{- $_ := set $config "tiers" $tiers }}
{{- $_ := set $config "server" (deepCopy (.Values.config.server | default dict)) }}
{{- $cluster := deepCopy (.Values.config.cluster | default dict) }}
{{- if eq (include "cachefs.membership" .) "kubernetes" }}
{{- $_ := set $cluster "membership" "kubernetes" }}
{{- $_ := set $cluster "kubernetes_service" (include "cachefs.peersService" .) }}
{{- $_ := set $cluster "kubernetes_namespace" .Release.Namespace }}
{{- $_ := set $cluster "kubernetes_port_name" "grpc" }}
{{- end }}
{{- $_ := set $config "cluster" $cluster }}
{{- $models := deepCopy (.Values.config.models | default dict) }}
{{- if $models.enabled }}
{{- /* The Lease that elects the writer of models' status: where the Role lets it be. */}}
{{- $_ := set $models "lease_namespace" .Release.Namespace }}
{{- end }}
{{- $_ := set $config "models" $models }}
{{- $csi := deepCopy (.Values.config.csi | default dict) }}
{{- $_ := set $csi "state_dir" (include "cachefs.csiStatePath" .) }}
{{- $_ := set $config "csi" $csi }}
{{- toYaml $config }}
{{- end }}
