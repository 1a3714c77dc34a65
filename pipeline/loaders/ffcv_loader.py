"""FFCV loader: `ffcv.loader.Loader` on the prepared `{split}.beton`.

FFCV (Leclerc et al., "FFCV: Accelerating Training by Removing Data Bottlenecks", CVPR 2023)
decodes batches with numba-compiled code in threads and copies them to the GPU on side streams.
The pipelines here decode the raw RGB field (`SimpleRGBImageDecoder`) and the int label, and on
CUDA end with `ToDevice(non_blocking=True)`: the yielded batch is uint8 [B,32,32,3] + int64 [B]
on the device. An augment op runs on the device right after loading, seeded like the resident
loader's.

Order (`order=`):
- "native" (default): FFCV's own traversal orders. Train: `OrderOption.RANDOM` -- for one
  process FFCV draws `np.random.default_rng(s + epoch).permutation(N)`, with `distributed=True`
  (world > 1) it uses torch's `DistributedSampler(seed=s)` with `set_epoch(epoch)` (strided
  shards, padded to equal size; rank and world come from `torch.distributed`, which must be
  initialised with the same values). `s = derive_seed("ffcv", seed) % 2**31`, so seeds do not
  alias as `seed + epoch` would. The order is reproducible from (seed, epoch) but it is FFCV's,
  not the shared order of the other loaders. Test: `OrderOption.SEQUENTIAL` over this rank's
  contiguous block (`indices=`), so the test split is complete, in order and unpadded.
- "shared": a custom `TraversalOrder` that returns the shared `(seed, epoch)` order of
  `pipeline.loaders.base` (and its sharding by rank/world, no process group needed): the ffcv
  loader then reads exactly the batches of the resident, cpu and dali loaders.

`set_epoch(e)` sets FFCV's `next_epoch`; FFCV itself advances it after every iteration, which
is the epoch rule of `base`. FFCV reuses its output buffers (`batches_ahead + 2` slots): a
yielded batch stays valid until that many more batches have been drawn -- clone it to keep it.
"""

from __future__ import annotations

import numpy as np
import torch.distributed as dist

from pipeline.backends import require
from pipeline.data.manifest import beton_file
from pipeline.errors import CnmError
from pipeline.loaders.base import BatchLoader, default_workers, derive_seed, test_shard_bounds

ORDERS = ("native", "shared")


def _shared_order_class():
    """A TraversalOrder subclass serving the shared order (built lazily: ffcv is optional)."""
    from ffcv.traversal_order.base import TraversalOrder

    class SharedOrder(TraversalOrder):
        # ffcv's Loader accepts a TraversalOrder *instance* and calls it with the loader
        # (`self.traversal_order = order(self)`), so the instance binds itself on call.
        def __init__(self, plan):  # deliberately not calling super().__init__ (no loader yet)
            self.plan = plan

        def __call__(self, loader):
            self.loader = loader
            self.indices = loader.indices
            self.seed = loader.seed
            self.distributed = loader.distributed
            self.sampler = None
            return self

        def sample_order(self, epoch: int):
            return self.plan.indices(epoch).numpy().astype(np.uint64)

    return SharedOrder


class FfcvLoader(BatchLoader):
    """ffcv.loader.Loader behind the batch contract.

    order: "native" | "shared" (see the module docstring). num_workers: FFCV's decoding threads
    (default: usable cores). batches_ahead: FFCV's prefetch depth. os_cache: FFCV's page-cache
    mode (True) or its own process cache (False).
    """

    name = "ffcv"

    def __init__(self, data_dir, split="train", batch_size=128, device="cpu", seed=0, rank=0, world=1,
                 drop_last=None, augment=None, order: str = "native", num_workers: int | None = None,
                 batches_ahead: int = 3, os_cache: bool = True):
        require("ffcv", "the ffcv loader")
        super().__init__(data_dir, split, batch_size, device, seed, rank, world, drop_last, augment)
        if order not in ORDERS:
            raise CnmError(f"unknown ffcv order {order!r} (choices: {', '.join(ORDERS)})")
        self.order = order
        name = beton_file(split)
        if not self.manifest.has(name):
            raise CnmError(f"{self.data_dir}: no {name} (ffcv was not installed when the data was prepared); "
                           f"pip install 'cnm[ffcv]' and re-run `cnm prepare --force`")
        self.manifest.verify([name])
        from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import ToDevice, ToTensor

        image_pipe = [SimpleRGBImageDecoder(), ToTensor()]
        label_pipe = [IntDecoder(), ToTensor()]  # int64 [B,1]; reshaped below (Squeeze breaks B=1)
        if self.device.type == "cuda":
            image_pipe.append(ToDevice(self.device, non_blocking=True))
            label_pipe.append(ToDevice(self.device, non_blocking=True))
        args = {"batch_size": self.batch_size, "num_workers": num_workers or default_workers(),
                    "os_cache": os_cache, "batches_ahead": batches_ahead,
                    "pipelines": {"image": image_pipe, "label": label_pipe}}
        n = self.manifest.counts[split]
        plan = self.plan
        ffcv_drop_last = plan.drop_last
        if order == "shared":
            args.update(order=_shared_order_class()(plan), seed=0, distributed=False)
        elif plan.shuffle:
            if self.world > 1:
                _check_process_group(self.rank, self.world)
            args.update(order=OrderOption.RANDOM, seed=derive_seed("ffcv", self.seed) % 2**31,
                        distributed=self.world > 1)
            # DistributedSampler pads every rank to ceil(n / world); `plan.drop_last` already
            # accounts for the tiny-dataset rule (a shard smaller than a batch keeps it).
        else:
            lo, hi = test_shard_bounds(n, self.rank, self.world)
            args.update(order=OrderOption.SEQUENTIAL, indices=np.arange(lo, hi), distributed=False)
        self._ffcv = None
        self._epoch_iter = None
        self._empty = (not plan.shuffle) and plan.shard_size == 0
        if not self._empty:
            self._ffcv = Loader(str(self.manifest.path(name)), drop_last=ffcv_drop_last, **args)

    def __len__(self) -> int:
        return 0 if self._ffcv is None else len(self._ffcv)

    @property
    def num_samples(self) -> int:
        if self._ffcv is None:
            return 0
        total = len(self._ffcv.first_traversal_order)
        return min(total, len(self) * self.batch_size)

    def _iter_epoch(self, epoch: int):
        if self._ffcv is None:
            return
        if self._epoch_iter is not None:  # a previous epoch left unfinished
            self._epoch_iter.close()
            self._epoch_iter = None
        self._ffcv.next_epoch = epoch
        self._epoch_iter = iter(self._ffcv)
        for step, (images, labels) in enumerate(self._epoch_iter):
            yield self._finish(images, labels.reshape(-1).long(), epoch, step)
        self._epoch_iter = None

    def close(self) -> None:
        if self._epoch_iter is not None:
            self._epoch_iter.close()
            self._epoch_iter = None


def _check_process_group(rank: int, world: int) -> None:
    """FFCV's distributed order takes rank/world from torch.distributed: they must agree."""
    if not (dist.is_available() and dist.is_initialized()):
        raise CnmError(f"the ffcv loader with world={world} shards through torch.distributed, which is not "
                       f"initialised; launch with torchrun, or pass order='shared'")
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise CnmError(f"ffcv loader: rank/world {rank}/{world} disagree with torch.distributed "
                       f"({dist.get_rank()}/{dist.get_world_size()})")
