"""GPU-resident loader: the whole uint8 split lives on the device; batches are gathered by index.

This is airbench's approach (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU",
2024): CIFAR's 50k x 32x32x3 uint8 train split is 150 MB, small enough to keep on the GPU, so
an epoch is one permutation upload and `index_select` per batch -- no host work, no host
synchronisation per batch, no workers. The permutation is the shared `(seed, epoch)` one of
`pipeline.loaders.base` (drawn on the host, copied to the device once per epoch), so this
loader reads exactly the batches of the cpu and dali loaders. With an augment op, each batch is
augmented on the device right after indexing, with a device generator seeded from
`(seed, epoch, rank, step)`.

On the CPU the split is kept in host memory and batches are gathered with `np.take` (torch's CPU
`index_select` runs through its OpenMP pool and stalls when the cores are busy); it is the
fastest CPU loader (see bench/loader_epoch.py).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.loaders.base import BatchLoader


class ResidentLoader(BatchLoader):
    """Whole split as device tensors: images uint8 [N,32,32,3], labels int64 [N]."""

    name = "resident"
    can_limit = True

    def __init__(self, data_dir, split="train", batch_size=128, device="cpu", seed=0, rank=0, world=1,
                 drop_last=None, augment=None, limit=None):
        super().__init__(data_dir, split, batch_size, device, seed, rank, world, drop_last, augment, limit)
        images, labels = self.manifest.load_split(split, mmap=False, verify=True)
        # Only this rank's part would suffice for the in-order test split, but the train split is
        # reshuffled over all samples every epoch, so every rank holds the whole split.
        self.images = _to_device(images, self.device)
        self.labels = _to_device(labels, self.device)

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size() + self.labels.numel() * 8

    def _iter_epoch(self, epoch: int):
        """The epoch's batches. The order is drawn on the host (and copied to the device) here,
        when the iteration starts; the batches that follow need no host synchronisation."""
        order = self.plan.indices(epoch)
        if self.device.type == "cpu":
            # numpy's row gather is single-threaded memcpy; torch's CPU index_select goes through
            # its OpenMP pool and stalls on barriers when the cores are busy (measured 0.1 ms vs
            # 1-20 ms per 512-image batch on a loaded 2-core machine).
            return self._host_batches(epoch, order.numpy(), self.images.numpy(), self.labels.numpy())
        return self._device_batches(epoch, order.pin_memory().to(self.device, non_blocking=True))

    def _host_batches(self, epoch: int, order_np, images_np, labels_np):
        for step, sl in enumerate(self.plan.batch_slices()):
            idx = order_np[sl]
            images = torch.from_numpy(np.take(images_np, idx, axis=0))
            labels = torch.from_numpy(np.take(labels_np, idx, axis=0))
            yield self._finish(images, labels, epoch, step)

    def _device_batches(self, epoch: int, order: torch.Tensor):
        for step, sl in enumerate(self.plan.batch_slices()):
            idx = order[sl]
            images = self.images.index_select(0, idx)
            labels = self.labels.index_select(0, idx)
            yield self._finish(images, labels, epoch, step)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.to(device) if device.type != "cpu" else t
