"""CIFAR sources, the synthetic set, and the prepared-dataset format (`manifest`)."""
