"""Tenancy: the tenants file, API keys, authentication and what a tenant may see; the
``modelgate tenants`` editor. May import: quota and the foundation modules."""
