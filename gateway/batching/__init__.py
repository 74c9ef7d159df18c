"""Batching: the dynamic batcher (a runtime wrapper with Triton's semantics), its queues and
its clock. May import: observability, tenancy, quota and the foundation modules."""
