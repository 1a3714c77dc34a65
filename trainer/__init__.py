"""Peer-ensemble online distillation: models, peers, losses, teacher, loop, checkpoints."""
