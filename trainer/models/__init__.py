"""CIFAR model definitions used by the online-distillation literature."""
