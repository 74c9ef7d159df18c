"""The process: settings-driven CLI, server wiring, worker supervision, TLS, the event loop
and the operator's HTTP port. May import every wing."""
