"""Telemetry for the front and the Triton backend: OpenTelemetry tracing (configured by the standard
OTEL_* variables), Prometheus metrics for the front, and plain or JSON-lines logging."""
