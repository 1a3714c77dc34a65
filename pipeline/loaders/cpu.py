"""The CPU-augment baseline: what a competent PyTorch user writes without cnm.

`torch.utils.data.DataLoader` over a memory-mapped `.npy` split with worker processes
(`num_workers` = usable CPU cores by default), `persistent_workers`, `prefetch_factor`,
`pin_memory` when the target is CUDA, and a `non_blocking` copy to the device. Without an
augment op, each worker reads its batch with one sorted gather from the memory map
(`__getitems__`) and yields the raw uint8 batch. With one, every sample goes through
`NumpyCutNMix.sample` in the worker (pad-4 random crop and flip, once per peer, in numpy) and
the batch is mixed and normalised on the CPU by `NumpyCutNMix.collate` in the worker's
`collate_fn` -- the classic per-sample-transform + mixing-collate structure (CutMix's and
timm's reference loaders work this way).

Determinism: the batch sampler runs in the main process and hands each worker keys
`(epoch, step, position, sample_index)`; the sample's numpy generator is seeded from
`sample_seed(seed, epoch, rank, step, position)` and the batch's mixing generator from
`augment_seed(seed, epoch, rank, step)`. The output is a pure function of (seed, epoch, rank),
whatever the number of workers. The order is the shared epoch order of `base`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.data.manifest import images_file
from pipeline.loaders.base import BatchLoader, augment_seed, default_workers, mixes, sample_seed
from pipeline.ops.numpy_baseline import NumpyCutNMix


class _SplitDataset(Dataset):
    """Per-sample view of one split; keys are (epoch, step, position, sample_index) tuples.

    The memory map is opened lazily in each process (a pickled memmap would copy the data).
    """

    def __init__(self, images_path: str, labels: np.ndarray, seed: int, rank: int, numpy_aug=None):
        self.images_path = images_path
        self.labels = labels
        self.seed = seed
        self.rank = rank
        self.numpy_aug = numpy_aug
        self._images = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_images"] = None
        return state

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r", allow_pickle=False)
        return self._images

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        """(views uint8 [P,32,32,3] or image uint8 [32,32,3], label int, key)."""
        epoch, step, pos, index = key
        image = np.asarray(self.images[index])
        if self.numpy_aug is None:
            return image, int(self.labels[index]), key
        rng = np.random.default_rng(sample_seed(self.seed, epoch, self.rank, step, pos))
        return self.numpy_aug.sample(image, rng), int(self.labels[index]), key

    def __getitems__(self, keys):
        if self.numpy_aug is not None:
            return [self[k] for k in keys]
        # raw batches: one sorted gather from the memory map instead of B small reads
        index = np.fromiter((k[3] for k in keys), dtype=np.int64, count=len(keys))
        order = np.argsort(index, kind="stable")
        images = np.empty((len(keys), *self.images.shape[1:]), np.uint8)
        images[order] = self.images[index[order]]
        return [("raw", images, self.labels[index])]


class _Collate:
    """collate_fn (runs in the workers): stack raw batches, or mix with NumpyCutNMix.collate."""

    def __init__(self, seed: int, rank: int, numpy_aug=None, unmixed=None, mix_off_epoch: int | None = None,
                 mix_on_epoch: int = 0):
        # outside [mix_on_epoch, mix_off_epoch), `unmixed`: the same op with mix_prob 0 (the same
        # draws, no sample mixed)
        self.seed, self.rank, self.numpy_aug, self.unmixed = seed, rank, numpy_aug, unmixed
        self.mix_on_epoch, self.mix_off_epoch = mix_on_epoch, mix_off_epoch

    def __call__(self, items):
        if self.numpy_aug is None:  # one ("raw", images, labels) item from __getitems__
            _, images, labels = items[0]
            return torch.from_numpy(images), torch.from_numpy(np.asarray(labels, dtype=np.int64))
        views = np.stack([it[0] for it in items])  # u8 [B,P,H,W,3]
        labels = np.asarray([it[1] for it in items], dtype=np.int64)
        epoch, step = items[0][2][0], items[0][2][1]
        rng = np.random.default_rng(augment_seed(self.seed, epoch, self.rank, step))
        mixing = mixes(epoch, self.mix_on_epoch, self.mix_off_epoch)
        return tuple((self.numpy_aug if mixing else self.unmixed).collate(views, labels, rng))


class _BatchKeys(Sampler):
    """Batch sampler in the main process: the current epoch's batches as lists of keys."""

    def __init__(self, loader: CpuLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        epoch = self.loader._current_epoch
        plan = self.loader.plan
        order = plan.indices(epoch).numpy()
        for step, sl in enumerate(plan.batch_slices()):
            yield [(epoch, step, pos, int(i)) for pos, i in enumerate(order[sl])]


class CpuLoader(BatchLoader):
    """DataLoader-with-workers baseline; yields the batch contract on `device`.

    num_workers: worker processes (default: usable CPU cores; 0 = in the main process).
    prefetch_factor: batches each worker prepares ahead (default 4).
    mix_on_epoch, mix_off_epoch: with `augment`, the epochs [on, off) whose samples may be mixed
    (`cnm train --mix-on-epoch / --mix-off-epoch`; off None: to the end).
    """

    name = "cpu"
    can_limit = True

    def __init__(self, data_dir, split="train", batch_size=128, device="cpu", seed=0, rank=0, world=1,
                 drop_last=None, augment=None, limit=None, num_workers: int | None = None,
                 prefetch_factor: int = 4, mix_off_epoch: int | None = None, mix_on_epoch: int = 0):
        super().__init__(data_dir, split, batch_size, device, seed, rank, world, drop_last, augment, limit)
        _, labels = self.manifest.load_split(split, mmap=True, verify=True)
        numpy_aug = unmixed = None
        if augment is not None:
            numpy_aug, unmixed = NumpyCutNMix(augment), NumpyCutNMix(augment.with_mix_prob(0.0))
        self.num_workers = default_workers() if num_workers is None else int(num_workers)
        self._current_epoch = 0
        self.dataset = _SplitDataset(str(self.manifest.path(images_file(split))), np.asarray(labels),
                                     self.seed, self.rank, numpy_aug)
        extra = {}
        if self.num_workers > 0:
            extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor}
        self.dataloader = DataLoader(
            self.dataset,
            batch_sampler=_BatchKeys(self),
            num_workers=self.num_workers,
            collate_fn=_Collate(self.seed, self.rank, numpy_aug, unmixed, mix_off_epoch, mix_on_epoch),
            pin_memory=self.device.type == "cuda",
            **extra,
        )

    def _iter_epoch(self, epoch: int):
        self._current_epoch = epoch
        non_blocking = self.device.type == "cuda"
        for batch in self.dataloader:
            yield tuple(t.to(self.device, non_blocking=non_blocking) for t in batch)

    def close(self) -> None:
        it = getattr(self.dataloader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.dataloader._iterator = None
