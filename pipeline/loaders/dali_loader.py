"""DALI loader: a DALI pipeline over the prepared `.npy` split, read through a memory map.

NVIDIA DALI (https://github.com/NVIDIA/DALI) runs the input pipeline in its own threads and
copies to the GPU asynchronously. The prepared format stores a split as one `[N,32,32,3]`
array, which `fn.readers.numpy` (one file per sample) cannot slice, and DALI's readers shuffle
with a bounded random buffer rather than a permutation. So the pipeline's source is
`fn.external_source` (batch mode, `batch_info=True`) over `np.load(mmap_mode="r")`, fed with the
shared `(seed, epoch)` order and `(rank, world)` sharding of `pipeline.loaders.base`: exactly the
batches of the resident and cpu loaders, reproducible, with `shard_id`/`num_shards` replaced by
that sharding. On CUDA the pipeline runs on `device_id` and moves each batch to the GPU
(`.gpu()`); without CUDA it is a CPU-only pipeline (`device_id=None`).

Epochs: the source maps DALI's epoch index (which counts `StopIteration`s since the pipeline was
built) to `base_epoch + epoch_idx`. DALI prefetches the next epoch as soon as one ends, so the
pipeline is rebuilt (cheap) whenever the requested epoch is not the one it prefetched -- after
`set_epoch` jumps, or after an epoch that was left unfinished.

Augment: with `native_augment=True` the DALI-native Cut^nMix graph (`pipeline.ops.dali_graph`:
slice/flip/multi_paste/arithmetic operators) runs inside the pipeline and DALI delivers finished
`(views, y_a, y_b, lam)`. Its parameters are drawn on the host, inside the source callback, with
`augment.draw` from a CPU generator seeded `augment_seed(seed, epoch, rank, step)` -- the very
parameters the resident loader draws on a CPU device, so on the CPU the two deliver identical
views (tested). Only the float32 -> out_dtype cast and the [P,B,3,H,W] channels-last stacking
happen in torch. Without the flag the augment op runs on the device right after loading, seeded
like the resident loader's.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.backends import require
from pipeline.data.manifest import images_file
from pipeline.errors import CnmError
from pipeline.loaders.base import BatchLoader, augment_seed, default_workers
from pipeline.ops import dali_graph


class _EpochSource:
    """external_source callback: BatchInfo(iteration, epoch_idx) -> this batch's arrays.

    Raw: (images u8 [b,32,32,3], labels i64 [b]). Native augment: additionally y_b i64 [b],
    lam f32 [b] and the per-sample parameter batches of `dali_graph.param_names(mode)`, drawn
    by `native_params(epoch, step, b)`.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, plan, base_epoch: int, native_params=None):
        self.images = images
        self.labels = labels
        self.plan = plan
        self.base_epoch = base_epoch
        self.native_params = native_params
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = self.plan.indices(epoch).numpy()
        return self._orders[epoch]

    def __call__(self, info):
        if info.iteration >= self.plan.num_batches:
            raise StopIteration
        epoch = self.base_epoch + info.epoch_idx
        b = self.plan.batch_size
        index = self._order(epoch)[info.iteration * b:(info.iteration + 1) * b]
        order = np.argsort(index, kind="stable")
        images = np.empty((len(index), *self.images.shape[1:]), np.uint8)
        images[order] = self.images[index[order]]  # sorted gather from the memory map
        labels = np.ascontiguousarray(self.labels[index])
        if self.native_params is None:
            return images, labels
        params = self.native_params(epoch, info.iteration, len(index))
        perm = params.perm.numpy()
        h, w = images.shape[1:3]
        return (images, labels, labels[perm], params.lam.numpy().astype(np.float32),
                *dali_graph.dali_param_batches(params, h, w))


class DaliLoader(BatchLoader):
    """DALI pipeline + DALIGenericIterator behind the batch contract.

    native_augment: run the DALI-native Cut^nMix graph (needs `augment`). num_threads: DALI CPU
    threads (default: usable cores). prefetch_queue_depth: DALI's prefetch depth.
    """

    name = "dali"

    def __init__(self, data_dir, split="train", batch_size=128, device="cpu", seed=0, rank=0, world=1,
                 drop_last=None, augment=None, native_augment: bool = False, num_threads: int | None = None,
                 prefetch_queue_depth: int = 2):
        require("nvidia.dali", "the dali loader")
        super().__init__(data_dir, split, batch_size, device, seed, rank, world, drop_last, augment)
        if native_augment and augment is None:
            raise CnmError("dali loader: native_augment=True needs an augment op (e.g. --mix cutnmix)")
        self.native_augment = bool(native_augment)
        self.images, self.labels = self.manifest.load_split(split, mmap=True, verify=True)
        self.images_path = self.manifest.path(images_file(split))
        self.num_threads = num_threads or default_workers()
        self.prefetch_queue_depth = prefetch_queue_depth
        self._iterator = None
        self._base_epoch = 0
        self._epochs_done = 0  # complete DALI epochs since the pipeline was built
        self._clean = False  # the last epoch ran to its end
        self._names: list[str] = []

    # ------------------------------------------------------------------ pipeline
    def _build(self, base_epoch: int) -> None:
        self.close()
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        gpu = self.device.type == "cuda"
        source = _EpochSource(self.images, self.labels, self.plan, base_epoch,
                              self._native_params if self.native_augment else None)
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                        device_id=self.device.index if gpu else None,
                        prefetch_queue_depth=self.prefetch_queue_depth, exec_dynamic=True,
                        seed=augment_seed(self.seed, base_epoch, self.rank, -1) % 2**31)
        with pipe:
            if self.native_augment:
                names = dali_graph.param_names(self.augment.mode)
                nodes = fn.external_source(source=source, num_outputs=4 + len(names), batch=True,
                                           batch_info=True, layout=["HWC"] + [""] * (3 + len(names)))
                images, labels, y_b, lam = nodes[:4]
                views = dali_graph.cutnmix_graph(images.gpu() if gpu else images, dict(zip(names, nodes[4:])),
                                                 peers=self.augment.peers, mode=self.augment.mode,
                                                 height=32, width=32, mean=self.augment.mean, std=self.augment.std)
                extra = [labels, y_b, lam]
                outputs = views + ([t.gpu() for t in extra] if gpu else extra)
                self._names = [f"view{k}" for k in range(len(views))] + ["y_a", "y_b", "lam"]
            else:
                images, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                                    dtype=[types.UINT8, types.INT64], layout=["HWC", ""])
                outputs = [images.gpu(), labels.gpu()] if gpu else [images, labels]
                self._names = ["images", "labels"]
            pipe.set_outputs(*outputs)
        self._iterator = DALIGenericIterator([pipe], self._names, auto_reset=True, prepare_first_batch=False)
        self._base_epoch = base_epoch
        self._epochs_done = 0

    def _native_params(self, epoch: int, step: int, batch: int):
        """CutNMixParams of this batch, drawn on the host from the (seed, epoch, rank, step) CPU
        generator: the same parameters the resident loader draws for it on a CPU device."""
        g = torch.Generator().manual_seed(augment_seed(self.seed, epoch, self.rank, step))
        return self.augment.draw(batch, "cpu", g)

    def _native_batch(self, d: dict):
        """DALI outputs -> (views [P,B,3,32,32] out_dtype channels-last per peer, y_a, y_b, lam)."""
        peers = self.augment.peers
        views = torch.stack([d[f"view{k}"] for k in range(peers)])  # float32 [P,B,H,W,3]
        views = views.to(self.augment.out_dtype).permute(0, 1, 4, 2, 3)
        return views, d["y_a"].long(), d["y_b"].long(), d["lam"].float()

    def _iter_epoch(self, epoch: int):
        if len(self) == 0:
            return
        if self._iterator is None or not self._clean or epoch != self._base_epoch + self._epochs_done:
            self._build(epoch)
        self._clean = False
        for step, out in enumerate(self._iterator):
            d = out[0]
            if self.native_augment:
                yield self._native_batch(d)
            else:
                yield self._finish(d["images"], d["labels"], epoch, step)
        self._clean = True
        self._epochs_done += 1

    def close(self) -> None:
        self._iterator = None  # DALI releases the pipeline with its last reference
