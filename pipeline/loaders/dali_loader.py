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

Augment: with `native_augment=True` the ops worker's DALI-native Cut^nMix graph
(`pipeline.ops.dali_graph`) runs inside the pipeline and DALI delivers finished
`(views, y_a, y_b, lam)`; otherwise the augment op runs on the device right after loading,
seeded like the resident loader's.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.backends import require
from pipeline.data.manifest import images_file
from pipeline.errors import CnmError
from pipeline.loaders.base import BatchLoader, augment_seed, default_workers


class _EpochSource:
    """external_source callback: BatchInfo(iteration, epoch_idx) -> (images u8 [b,32,32,3], labels i64 [b])."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, plan, base_epoch: int, params_fn=None):
        self.images = images
        self.labels = labels
        self.plan = plan
        self.base_epoch = base_epoch
        self.params_fn = params_fn  # (epoch, step, batch) -> list of per-batch param arrays (native)
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
        out = [images, np.ascontiguousarray(self.labels[index])]
        if self.params_fn is not None:
            out.extend(self.params_fn(epoch, info.iteration, len(index)))
        return out


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
        self._graph = None

    # ------------------------------------------------------------------ pipeline
    def _build(self, base_epoch: int) -> None:
        self.close()
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        gpu = self.device.type == "cuda"
        params_fn = None
        if self.native_augment:
            graph = self._native_graph()
            params_fn = graph.params_source(self)
        source = _EpochSource(self.images, self.labels, self.plan, base_epoch, params_fn)
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                        device_id=self.device.index if gpu else None,
                        prefetch_queue_depth=self.prefetch_queue_depth, exec_dynamic=True,
                        seed=augment_seed(self.seed, base_epoch, self.rank, -1) % 2**31)
        with pipe:
            if self.native_augment:
                outputs = self._graph.define(source, gpu=gpu)
                names = ["views", "y_a", "y_b", "lam"]
            else:
                images, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                                    dtype=[types.UINT8, types.INT64], layout=["HWC", ""])
                outputs = [images.gpu(), labels.gpu()] if gpu else [images, labels]
                names = ["images", "labels"]
            pipe.set_outputs(*outputs)
        self._names = names
        self._iterator = DALIGenericIterator([pipe], names, auto_reset=True, prepare_first_batch=False)
        self._base_epoch = base_epoch
        self._epochs_done = 0

    def _native_graph(self):
        from pipeline.ops import dali_graph  # the ops worker's DALI-native Cut^nMix graph

        if self._graph is None:
            self._graph = dali_graph.build(self.augment, self.seed, self.rank)
        return self._graph

    def _iter_epoch(self, epoch: int):
        if len(self) == 0:
            return
        if self._iterator is None or not self._clean or epoch != self._base_epoch + self._epochs_done:
            self._build(epoch)
        self._clean = False
        step = 0
        for out in self._iterator:
            d = out[0]
            if self.native_augment:
                yield self._graph.finish(d, self.device)
            else:
                yield self._finish(d["images"], d["labels"], epoch, step)
            step += 1
        self._clean = True
        self._epochs_done += 1

    def close(self) -> None:
        self._iterator = None  # DALI releases the pipeline with its last reference
