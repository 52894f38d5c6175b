"""Neural-similarity layers (to be written)."""
