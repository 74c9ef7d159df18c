"""Observability: Prometheus metrics, OpenTelemetry tracing, the access log, Triton-style
statistics and the runtime wrappers that feed them. May import: tenancy, quota, foundation."""
