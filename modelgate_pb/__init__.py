"""Generated code from protos/ -- do not edit these modules by hand.
Regenerate with `make proto` (runs scripts/gen_protos.py)."""
