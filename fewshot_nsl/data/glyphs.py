"""Embedded glyphs dataset (to be written)."""
