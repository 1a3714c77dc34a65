"""Cut^nMix and its variants as batch ops (see DESIGN.md, section Cut^nMix)."""
