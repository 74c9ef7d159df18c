"""Quotas: per-tenant limits and the stores that charge them (in-process, shared memory
across workers, Redis across replicas). May import: gateway's foundation modules."""
