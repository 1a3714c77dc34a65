"""Throughput measurement of augmentation, loading and the train step (`cnm bench`)."""
