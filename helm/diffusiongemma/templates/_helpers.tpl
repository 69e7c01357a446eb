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
