"""The process: settings-driven CLI, the composition root and its frontends (gRPC, REST, the
metrics port), worker supervision, TLS, the event loop. May import every wing."""
