{{- define "balansis.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's objects' name: the release name, with the chart's unless it already holds it. */}}
{{- define "balansis.fullname" -}}
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

{{/* The LeaderWorkerSet's name. Not the fullname: the LWS controller makes a headless Service of its own
name (the leader's address, LWS_LEADER_ADDRESS), which the HTTP Service must not take. Short, as pod
names add "-<group>-<worker>" to it. */}}
{{- define "balansis.lwsName" -}}
{{- printf "%s-lws" (include "balansis.fullname" . | trunc 45 | trimSuffix "-") }}
{{- end }}

{{- define "balansis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "balansis.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "balansis.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "balansis.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "balansis.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* GPUs of each pod. */}}
{{- define "balansis.gpusPerPod" -}}
{{- if eq .Values.mode "multiHost" }}{{ .Values.multiHost.gpusPerHost }}{{ else }}{{ .Values.gpus }}{{ end }}
{{- end }}

{{/* Devices each weight is split over: every GPU of one pod. Tensor-parallel groups stay inside a host
(the engine's mesh puts each process's devices in one `model` row); hosts are data-parallel replicas. */}}
{{- define "balansis.tensorParallelSize" -}}
{{- if eq .Values.mode "multiHost" }}{{ .Values.multiHost.gpusPerHost }}
{{- else if eq .Values.mode "multiGpu" }}{{ .Values.gpus }}
{{- else }}1{{ end }}
{{- end }}

{{- define "balansis.dataParallelSize" -}}
{{- if eq .Values.mode "multiHost" }}{{ .Values.multiHost.hosts }}{{ else }}1{{ end }}
{{- end }}

{{/* Time for preStop, the drain and the process's exit: computed, so it cannot be set too short. */}}
{{- define "balansis.terminationGracePeriodSeconds" -}}
{{- add .Values.shutdown.preStopSeconds (ceil .Values.shutdown.drainTimeout) 15 }}
{{- end }}

{{/* A server's pod template. Arguments: root (the chart's context) and role: "server" (a Deployment's pod),
"leader" (pod 0 of an LWS group: serves HTTP) or "worker" (the group's other pods: follow the leader, serve
nothing, so they have no HTTP probes). */}}
{{- define "balansis.podTemplate" -}}
{{- $root := .root }}
{{- $values := $root.Values }}
{{- $role := .role }}
{{- $gpus := include "balansis.gpusPerPod" $root | atoi }}
{{- $tp := include "balansis.tensorParallelSize" $root | atoi }}
{{- $dp := include "balansis.dataParallelSize" $root | atoi }}
{{- $preStop := $values.shutdown.preStopSeconds }}
{{- if eq $role "worker" }}
{{- /* A worker must keep following while the leader drains: the leader's in-flight requests need every
host. It exits by itself when the leader stops; SIGTERM only comes after the leader's drain. */}}
{{- $preStop = add $values.shutdown.preStopSeconds (ceil $values.shutdown.drainTimeout) 5 }}
{{- end -}}
metadata:
  labels:
    {{- include "balansis.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ $role }}
    {{- with $values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  enableServiceLinks: false
  automountServiceAccountToken: false
  {{- with $values.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with $values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $values.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with $values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  terminationGracePeriodSeconds: {{ include "balansis.terminationGracePeriodSeconds" $root }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    runAsGroup: 0
    fsGroup: 0
    {{- /* Not a walk over every file of a large models volume at each start. */}}
    fsGroupChangePolicy: OnRootMismatch
    seccompProfile:
      type: RuntimeDefault
  containers:
    - name: balansis
      image: {{ include "balansis.image" $root | quote }}
      imagePullPolicy: {{ $values.image.pullPolicy }}
      {{- with $values.extraArgs }}
      args:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      env:
        - name: BALANSIS_DRAIN_TIMEOUT
          value: {{ $values.shutdown.drainTimeout | quote }}
        - name: BALANSIS_REQUIRE_AUTH
          value: {{ $values.requireAuth | quote }}
        {{- with $values.model.paths }}
        - name: BALANSIS_MODEL
          value: {{ join " " . | quote }}
        {{- end }}
        {{- with $values.model.servedModelNames }}
        - name: BALANSIS_SERVED_MODEL_NAME
          value: {{ join " " . | quote }}
        {{- end }}
        {{- if gt $tp 1 }}
        - name: BALANSIS_TENSOR_PARALLEL_SIZE
          value: {{ $tp | quote }}
        {{- end }}
        {{- if gt $dp 1 }}
        - name: BALANSIS_DATA_PARALLEL_SIZE
          value: {{ $dp | quote }}
        {{- end }}
        {{- if eq $values.mode "multiHost" }}
        {{- /* The LWS controller sets LWS_LEADER_ADDRESS, LWS_GROUP_SIZE and LWS_WORKER_INDEX. */}}
        - name: BALANSIS_COORDINATOR_PORT
          value: {{ $values.multiHost.coordinatorPort | quote }}
        {{- end }}
        {{- if eq $gpus 0 }}
        {{- /* The image says NVIDIA_VISIBLE_DEVICES=all: on a GPU node it would hand a CPU pod every GPU. */}}
        - name: NVIDIA_VISIBLE_DEVICES
          value: void
        {{- end }}
        {{- $secretKeys := dict
              "BALANSIS_API_KEY" $values.secret.keys.apiKey
              "BALANSIS_JWT_SECRET" $values.secret.keys.jwtSecret
              "BALANSIS_DATABASE_URL" $values.secret.keys.databaseUrl
              "BALANSIS_REDIS_URL" $values.secret.keys.redisUrl }}
        {{- range $variable, $key := $secretKeys }}
        {{- if $key }}
        - name: {{ $variable }}
          valueFrom:
            secretKeyRef:
              name: {{ required "secret.name: the Secret that secret.keys are read from" $values.secret.name }}
              key: {{ $key }}
        {{- end }}
        {{- end }}
        {{- with $values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if ne $role "worker" }}
      ports:
        - name: http
          containerPort: 8000
          protocol: TCP
        {{- if eq $role "leader" }}
        - name: coordinator
          containerPort: {{ $values.multiHost.coordinatorPort }}
          protocol: TCP
        {{- end }}
      startupProbe:
        httpGet:
          path: /health
          port: http
        periodSeconds: {{ $values.probes.startup.periodSeconds }}
        {{- /* ceil(maxSeconds / periodSeconds) */}}
        failureThreshold: {{ div (add $values.probes.startup.maxSeconds $values.probes.startup.periodSeconds -1) $values.probes.startup.periodSeconds }}
        timeoutSeconds: 5
      readinessProbe:
        httpGet:
          path: /ready
          port: http
        {{- toYaml $values.probes.readiness | nindent 8 }}
      livenessProbe:
        httpGet:
          path: /health
          port: http
        {{- toYaml $values.probes.liveness | nindent 8 }}
      {{- end }}
      lifecycle:
        preStop:
          exec:
            command: ["sleep", {{ $preStop | quote }}]
      resources:
        {{- $resources := deepCopy $values.resources }}
        {{- if gt $gpus 0 }}
        {{- $_ := set $resources "requests" (merge (dict "nvidia.com/gpu" $gpus) ($resources.requests | default dict)) }}
        {{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" $gpus) ($resources.limits | default dict)) }}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities:
          drop: ["ALL"]
      volumeMounts:
        {{- if $values.persistence.models.enabled }}
        - name: models
          mountPath: /models
          readOnly: true
        {{- end }}
        - name: cache
          mountPath: /cache
        - name: data
          mountPath: /data
        - name: tmp
          mountPath: /tmp
        - name: shm
          mountPath: /dev/shm
  volumes:
    {{- with $values.persistence.models }}
    {{- if .enabled }}
    - name: models
      persistentVolumeClaim:
        claimName: {{ .existingClaim | default (printf "%s-models" (include "balansis.fullname" $root)) }}
        readOnly: true
    {{- end }}
    {{- end }}
    - name: cache
      {{- with $values.persistence.cache }}
      {{- if .enabled }}
      persistentVolumeClaim:
        claimName: {{ .existingClaim | default (printf "%s-cache" (include "balansis.fullname" $root)) }}
      {{- else }}
      emptyDir: {}
      {{- end }}
      {{- end }}
    {{- /* HOME: the SQLite store when no database URL is given, per pod. */}}
    - name: data
      emptyDir: {}
    - name: tmp
      emptyDir: {}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $values.shm.sizeLimit }}
  {{- if or (gt $gpus 0) $values.tolerations }}
  tolerations:
    {{- if gt $gpus 0 }}
    - key: nvidia.com/gpu
      operator: Exists
      effect: NoSchedule
    {{- end }}
    {{- with $values.tolerations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  {{- with $values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* A PersistentVolumeClaim unless disabled or an existing one is named. Arguments: root, name (the
persistence key), volume (its values). */}}
{{- define "balansis.pvc" -}}
{{- with .volume }}
{{- if and .enabled (not .existingClaim) }}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {{ printf "%s-%s" (include "balansis.fullname" $.root) $.name }}
  labels:
    {{- include "balansis.labels" $.root | nindent 4 }}
spec:
  accessModes:
    {{- toYaml .accessModes | nindent 4 }}
  {{- if eq .storageClass "-" }}
  storageClassName: ""
  {{- else if .storageClass }}
  storageClassName: {{ .storageClass }}
  {{- end }}
  resources:
    requests:
      storage: {{ .size }}
{{- end }}
{{- end }}
{{- end }}
