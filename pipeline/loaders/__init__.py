"""Loaders that yield the batch contract (see DESIGN.md, section Batch contract)."""
