"""PyTorch reference models used by the parity tests (written from the spec, not imported)."""
