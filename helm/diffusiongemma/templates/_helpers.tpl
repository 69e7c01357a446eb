{{- define "dg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dg.fullname" -}}
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

{{- define "dg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dg.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "dg.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: diffusiongemma
{{- end -}}

{{- define "dg.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "dg.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dg.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "dg.tlsOn" -}}
{{- if ne (upper .Values.tls.mode) "DISABLED" -}}true{{- end -}}
{{- end -}}

{{/* The health-check command for exec probes and the test pod (TLS needs a client that speaks it). */}}
{{- define "dg.healthArgs" -}}
- --tls-ca
- /etc/dgemma/tls/ca.crt
{{- if eq (upper .Values.tls.mode) "MTLS" }}
- --tls-cert
- /etc/dgemma/tls/tls.crt
- --tls-key
- /etc/dgemma/tls/tls.key
{{- end }}
{{- end -}}

{{/* Seconds: drain + grace + Triton's stop (20 s, then 5 s after SIGKILL) + span flush (5 s) + 15 s margin. */}}
{{- define "dg.terminationGrace" -}}
{{- add .Values.server.shutdownDrainDelaySeconds .Values.server.shutdownGracePeriodSeconds 45 -}}
{{- end -}}

{{- define "dg.tlsVolumeMounts" -}}
{{- if include "dg.tlsOn" . }}
- name: tls
  mountPath: /etc/dgemma/tls
  readOnly: true
{{- end }}
{{- if .Values.auth.apiKeysSecret }}
- name: api-keys
  mountPath: /etc/dgemma/api-keys
  readOnly: true
{{- end }}
{{- end -}}

{{- define "dg.tlsVolumes" -}}
{{- if include "dg.tlsOn" . }}
- name: tls
  secret:
    secretName: {{ required "tls.secretName is required when tls.mode is TLS or MTLS" .Values.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- if .Values.auth.apiKeysSecret }}
- name: api-keys
  secret:
    secretName: {{ .Values.auth.apiKeysSecret }}
    defaultMode: 0440
    items:
      - key: {{ .Values.auth.key }}
        path: keys
{{- end }}
{{- end -}}

{{/* "true" when the rolling update may start a pod before one stops (maxSurge not 0 or 0%). */}}
{{- define "dg.surges" -}}
{{- $s := .Values.strategy -}}
{{- if eq $s.type "RollingUpdate" -}}
{{- $ru := default dict $s.rollingUpdate -}}
{{- /* unset: Kubernetes' default, 25% */ -}}
{{- if not (has (ternary (toString $ru.maxSurge) "25%" (hasKey $ru "maxSurge")) (list "0" "0%")) -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/* Values that cannot work together fail the render with the value to change. */}}
{{- define "dg.checkRollout" -}}
{{- $s := .Values.strategy -}}
{{- if and (eq $s.type "RollingUpdate") (not (include "dg.surges" .)) -}}
{{- $ru := default dict $s.rollingUpdate -}}
{{- if has (ternary (toString $ru.maxUnavailable) "25%" (hasKey $ru "maxUnavailable")) (list "0" "0%") -}}
{{- fail "strategy.rollingUpdate: maxSurge and maxUnavailable are both 0: no pod could ever be replaced" -}}
{{- end -}}
{{- end -}}
{{- $store := .Values.modelStore -}}
{{- if $store.enabled -}}
{{- $modes := $store.accessModes -}}
{{- $writable := or (has "ReadWriteMany" $modes) (has "ReadWriteOnce" $modes) (has "ReadWriteOncePod" $modes) -}}
{{- if and .Values.build.enabled (not (has "ReadWriteMany" $modes)) -}}
{{- fail (printf "build.enabled: the build Job writes the model store while the server's pods read it, on any node: modelStore.accessModes must include ReadWriteMany (got %s)" (join ", " $modes)) -}}
{{- end -}}
{{- if and (has "ReadWriteOncePod" $modes) (or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled (include "dg.surges" .)) -}}
{{- fail "modelStore.accessModes ReadWriteOncePod admits one pod: use replicaCount 1, no autoscaling and strategy maxSurge 0, or ReadWriteMany / ReadOnlyMany" -}}
{{- end -}}
{{- if and (not $writable) (not $store.existingClaim) (not $store.dataSource) -}}
{{- fail "modelStore.accessModes ReadOnlyMany: nothing can write a new claim: set modelStore.dataSource (a VolumeSnapshot or PVC holding the checkpoints) or modelStore.existingClaim, or use ReadWriteMany" -}}
{{- end -}}
{{- end -}}
{{- end -}}
