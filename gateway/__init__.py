"""Everything that serves, grouped in wings (see docs/architecture.md). The foundation
modules at this level (errors, sanitize, settings, status) import no wing."""
