"""What every loader shares: the epoch order, the sharding, the epoch counter, augment seeding.

Epoch order (resident, cpu, dali, and ffcv with ``order="shared"``)
    ``epoch_permutation(n, seed, epoch)`` = ``torch.randperm(n)`` drawn with a CPU
    ``torch.Generator`` seeded from ``derive_seed("order", seed, epoch)`` (a 63-bit BLAKE2b hash,
    so nearby seeds and epochs give unrelated streams). It is drawn on the host once per epoch
    (about 1 ms for 50k samples) and, for the resident loader, copied to the device once per
    epoch: the same ``(seed, epoch)`` therefore gives the same order on every loader and on every
    device (a permutation drawn by a CUDA generator would differ from the CPU one).

Sharding by ``(rank, world)`` (see ``EpochPlan``)
    train (shuffled): the permutation is cut to a multiple of ``world`` -- with ``drop_last``
    its last ``n % world`` entries are dropped (other samples every epoch), without it the
    permutation is padded with its own first entries (as ``DistributedSampler`` does) -- and
    rank ``r`` takes every ``world``-th entry starting at ``r``. Every rank thus yields the same
    number of samples and batches (DDP needs equal batch counts); for ``drop_last`` the ranks'
    shards partition the used part of the epoch exactly.
    test (in order): rank ``r`` reads the contiguous block ``[r*n//world, (r+1)*n//world)`` in
    order, with no padding, so the ranks' outputs concatenated by rank are the split, complete
    and in order. Block sizes differ by at most one sample, so batch counts may differ by one.

``drop_last=None`` means True for train and False for test, except that a train shard smaller
than one batch keeps its one partial batch instead of yielding an empty epoch; an explicit
``drop_last=True`` that would leave no batch is a CnmError.

Epoch counter
    ``set_epoch(e)`` (like ``DistributedSampler.set_epoch``) makes the next iteration epoch
    ``e``. An iteration that was not preceded by ``set_epoch`` runs the epoch after the previous
    one (0 first), so a plain ``for epoch ...: for batch in loader`` reshuffles every epoch.

Augment seeding
    With an augment op, batch ``step`` of epoch ``epoch`` on rank ``rank`` draws its random
    parameters from a generator seeded with ``augment_seed(seed, epoch, rank, step)``; the cpu
    baseline seeds each sample's numpy generator with ``sample_seed(seed, epoch, rank, step,
    position)``. Both are pure functions of the batch's place in the run, so the result does not
    depend on worker counts or prefetch depth.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.manifest import Manifest, load_manifest
from pipeline.errors import CnmError

SEED_MASK = (1 << 63) - 1


def derive_seed(tag: str, *values: int) -> int:
    """A 63-bit seed from a tag and integers (BLAKE2b): stable across runs, machines, Pythons."""
    h = hashlib.blake2b(tag.encode(), digest_size=8)
    for v in values:
        h.update(struct.pack("<q", int(v)))
    return int.from_bytes(h.digest(), "little") & SEED_MASK


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shared epoch order: int64 [n] on the CPU, a permutation of 0..n-1 from (seed, epoch)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed("order", seed, epoch))
    return torch.randperm(n, generator=g, dtype=torch.int64)


def augment_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    """Seed of the augment generator for batch `step` of `epoch` on `rank`."""
    return derive_seed("augment", seed, epoch, rank, step)


def mixes(epoch: int, mix_on_epoch: int = 0, mix_off_epoch: int | None = None) -> bool:
    """Whether the batches of `epoch` mix (`cnm train --mix-on-epoch / --mix-off-epoch`): epochs
    in [mix_on_epoch, mix_off_epoch) do (None: no end); the others draw the same parameters with
    mix_prob 0, the base views only."""
    return epoch >= mix_on_epoch and (mix_off_epoch is None or epoch < mix_off_epoch)


def sample_seed(seed: int, epoch: int, rank: int, step: int, position: int) -> int:
    """Seed of the numpy generator of the sample at `position` of that batch (cpu baseline)."""
    return derive_seed("sample", seed, epoch, rank, step, position)


def test_shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous block of an in-order split."""
    return rank * n // world, (rank + 1) * n // world


@dataclass(frozen=True)
class EpochPlan:
    """Which samples, in which order, rank `rank` reads in an epoch, and how they are batched.

    n: samples in the split; shuffle: train order (else in order); drop_last: the effective value
    (after resolving None and the tiny-dataset rule); num_samples: samples this rank yields per
    epoch; num_batches: len(loader).
    """

    n: int
    batch_size: int
    seed: int
    rank: int
    world: int
    shuffle: bool
    drop_last: bool
    shard_size: int  # samples in this rank's shard (before dropping a partial batch)

    @property
    def num_batches(self) -> int:
        if self.drop_last:
            return self.shard_size // self.batch_size
        return -(-self.shard_size // self.batch_size)

    @property
    def num_samples(self) -> int:
        return min(self.shard_size, self.num_batches * self.batch_size)

    def indices(self, epoch: int) -> torch.Tensor:
        """int64 [num_samples] CPU: the sample indices this rank reads in `epoch`, in order."""
        if not self.shuffle:
            lo, _hi = test_shard_bounds(self.n, self.rank, self.world)
            return torch.arange(lo, lo + self.num_samples, dtype=torch.int64)
        perm = epoch_permutation(self.n, self.seed, epoch)
        used = self.shard_size * self.world
        if used > self.n:  # pad with the permutation's own first entries (DistributedSampler)
            reps = -(-used // self.n)
            perm = perm.repeat(reps)
        perm = perm[:used]
        return perm[self.rank::self.world][: self.num_samples].clone()

    def batch_slices(self) -> Iterator[slice]:
        for b in range(self.num_batches):
            yield slice(b * self.batch_size, min((b + 1) * self.batch_size, self.num_samples))


def make_plan(n: int, *, split: str, batch_size: int, seed: int, rank: int, world: int,
              drop_last: bool | None) -> EpochPlan:
    """Validate the arguments and lay out the epoch (rules in the module docstring)."""
    check_sharding(batch_size, rank, world)
    shuffle = split == "train"
    if not shuffle:
        lo, hi = test_shard_bounds(n, rank, world)
        plan = EpochPlan(n, batch_size, seed, rank, world, False, bool(drop_last), hi - lo)
        if drop_last and plan.num_batches == 0 and plan.shard_size > 0:
            raise CnmError(f"{split}: {plan.shard_size} samples on rank {rank} with batch size {batch_size} "
                           f"and drop_last=True leaves no batch; lower the batch size or drop_last=False")
        return plan
    if n == 0:
        raise CnmError(f"{split}: the split is empty")
    if drop_last is None or drop_last:
        plan = EpochPlan(n, batch_size, seed, rank, world, True, True, n // world)
        if plan.num_batches > 0:
            return plan
        if drop_last:
            raise CnmError(f"{split}: {n} samples over {world} rank(s) with batch size {batch_size} and "
                           f"drop_last=True leaves no full batch; lower the batch size or drop_last=False")
    return EpochPlan(n, batch_size, seed, rank, world, True, False, -(-n // world))


def check_sharding(batch_size: int, rank: int, world: int) -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise CnmError(f"batch size must be a positive integer, got {batch_size!r}")
    if not isinstance(world, (int, np.integer)) or world < 1:
        raise CnmError(f"world size must be a positive integer, got {world!r}")
    if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world:
        raise CnmError(f"rank must be in 0..{world - 1}, got {rank!r}")


def resolve_device(device) -> torch.device:
    """torch.device from 'cpu' | 'cuda' | 'cuda:N' | 'auto' | torch.device; CnmError if unusable."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise CnmError(f"unknown device {device!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CnmError(f"device {device!r} requested but CUDA is not available; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise CnmError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise CnmError(f"device {device!r} is not supported (cpu or cuda)")
    return dev


def default_workers() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class BatchLoader:
    """Base of the four loaders: one split of a prepared directory, one rank's share of it.

    Iterating yields, per batch, ``(images uint8 [B,32,32,3], labels int64 [B])`` on `device`,
    or with `augment` ``(views [P,B,3,32,32] augment.out_dtype, y_a int64 [B], y_b int64 [B],
    lam float32 [B])``. `len(loader)` is the number of batches per epoch on this rank and
    `num_samples` the number of samples they hold.
    """

    name = "base"
    can_limit = False   # whether `limit=N` (read only the split's first N samples) is supported

    def __init__(self, data_dir, split: str = "train", batch_size: int = 128, device="cpu",
                 seed: int = 0, rank: int = 0, world: int = 1, drop_last: bool | None = None,
                 augment=None, limit: int | None = None):
        check_sharding(batch_size, rank, world)
        self.device = resolve_device(device)
        self.manifest: Manifest = load_manifest(data_dir)
        if split not in self.manifest.counts:
            raise CnmError(f"{self.manifest.root}: no split {split!r} (have: {', '.join(self.manifest.counts)})")
        self.data_dir = self.manifest.root
        self.split = split
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world = int(world)
        self.augment = augment
        n = self.manifest.counts[split] if limit is None else min(int(limit), self.manifest.counts[split])
        self.plan = make_plan(n, split=split, batch_size=self.batch_size,
                              seed=self.seed, rank=self.rank, world=self.world, drop_last=drop_last)
        self._epoch = 0
        self._epoch_is_set = False
        self._started = False
        self._aug_generator: torch.Generator | None = None

    # ------------------------------------------------------------------ epoch bookkeeping
    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch `epoch` (reshuffle from (seed, epoch))."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise CnmError(f"epoch must be a non-negative integer, got {epoch!r}")
        self._epoch = int(epoch)
        self._epoch_is_set = True

    @property
    def epoch(self) -> int:
        """The epoch of the current (or next, before the first) iteration."""
        return self._epoch

    def _begin_epoch(self) -> int:
        if self._started and not self._epoch_is_set:
            self._epoch += 1
        self._started = True
        self._epoch_is_set = False
        return self._epoch

    def __len__(self) -> int:
        return self.plan.num_batches

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (after sharding, padding and drop_last)."""
        return self.plan.num_samples

    @property
    def drop_last(self) -> bool:
        return self.plan.drop_last

    def __iter__(self):
        return self._iter_epoch(self._begin_epoch())

    def _iter_epoch(self, epoch: int):  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ augment on the device
    def augment_generator(self, epoch: int, step: int) -> torch.Generator:
        """The generator (on self.device) whose draws augment batch `step` of `epoch`.

        Re-seeding a CUDA generator only sets host-side state: no device synchronisation.
        """
        if self._aug_generator is None:
            self._aug_generator = torch.Generator(device=self.device)
        self._aug_generator.manual_seed(augment_seed(self.seed, epoch, self.rank, step))
        return self._aug_generator

    def _finish(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, step: int):
        """The yielded batch: raw, or augmented on the device with the (epoch, step) generator."""
        if self.augment is None:
            return images, labels
        return self.augment(images, labels, generator=self.augment_generator(epoch, step))

    def close(self) -> None:
        """Release worker processes / pipelines (the loader may not be iterated afterwards)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, batch_size={self.batch_size}, "
                f"device={str(self.device)!r}, rank={self.rank}, world={self.world}, "
                f"batches={len(self)}, samples={self.num_samples}, augment={self.augment is not None})")
