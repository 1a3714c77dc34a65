"""CIFAR sources, the synthetic set, and the prepared-dataset format.

- `manifest`: the prepared-directory format (`write_dataset`, `load_manifest`), atomic writes.
- `cifar`: reads and verifies the official python release (restricted unpickler).
- `download`: fetches the official tarballs (MD5 checked, cached).
- `synthetic`: a small learnable CIFAR-shaped set for offline use and tests.
- `prepare`: `cnm prepare` (source -> verified arrays -> prepared directory).
"""
