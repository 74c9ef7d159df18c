"""Model lifecycle and routing: served versions, reconciliation with the store, leases,
version resolution, shadow traffic, model control. May import every wing below pipeline."""
