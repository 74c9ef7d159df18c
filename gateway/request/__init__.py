"""The request wing: the typed per-request context every transport builds and the pipeline
and runtime wrappers read. May import: tenancy, quota and the foundation modules."""
