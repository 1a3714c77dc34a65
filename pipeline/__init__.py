"""Data side of cnm: CIFAR sources and `prepare`, loaders, and the Cut^nMix ops.

Heavy optional back-ends (ffcv, nvidia.dali, triton) are imported lazily through
`pipeline.backends`, so this package and its CPU paths work where they are absent.
"""
