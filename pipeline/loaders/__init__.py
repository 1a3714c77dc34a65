"""Loaders that yield the batch contract (docs/design.md#the-batch-contract).

```python
from pipeline.loaders import make_loader
loader = make_loader("ffcv" | "dali" | "resident" | "cpu" | "auto", data_dir, split="train",
                     batch_size=128, device="cpu", seed=0, rank=0, world=1, drop_last=None,
                     augment=None, limit=None)
loader.set_epoch(e)                  # like DistributedSampler.set_epoch
for images, labels in loader: ...    # uint8 [B,32,32,3], int64 [B] on `device`
# with augment=CutNMix(...): for views, y_a, y_b, lam in loader: ...
```

`limit=N` reads only the split's first N samples (resident and cpu loaders; `--limit-train`).
`len(loader)` is the number of batches per epoch on this rank, `loader.num_samples` the samples
they hold, `loader.name` the back-end actually used (for "auto": the one it picked). Epoch
order, sharding, `drop_last` and augment seeding are defined once in `pipeline.loaders.base`.
Back-end specific keyword arguments (`order=` for ffcv, `native_augment=` for dali,
`num_workers=` for cpu) pass through `**options`; with "auto" those the picked loader does not
take are dropped.
"""

from __future__ import annotations

import importlib
import inspect

import torch

from pipeline import backends
from pipeline.data.manifest import beton_file, load_manifest
from pipeline.errors import CnmError
from pipeline.loaders.base import BatchLoader, epoch_permutation, resolve_device

__all__ = ["CHOICES", "LOADERS", "BatchLoader", "auto_rule", "choose_auto", "epoch_permutation", "make_loader"]

# name -> (module, class, optional back-end import name)
LOADERS: dict[str, tuple[str, str, str | None]] = {
    "resident": ("pipeline.loaders.resident", "ResidentLoader", None),
    "dali": ("pipeline.loaders.dali_loader", "DaliLoader", "nvidia.dali"),
    "ffcv": ("pipeline.loaders.ffcv_loader", "FfcvLoader", "ffcv"),
    "cpu": ("pipeline.loaders.cpu", "CpuLoader", None),
}
CHOICES = ("auto", *LOADERS)

# On CUDA, the resident loader is used when the split takes at most this fraction of the free
# device memory (the rest is for the model, activations and the augmented views).
RESIDENT_MAX_FRACTION = 0.25


def loader_class(name: str) -> type[BatchLoader]:
    if name not in LOADERS:
        raise CnmError(f"unknown loader {name!r} (choices: {', '.join(CHOICES)})")
    module, cls, backend = LOADERS[name]
    if backend is not None:
        backends.require(backend, f"the {name} loader")
    return getattr(importlib.import_module(module), cls)


def choose_auto(data_dir, split: str = "train", device="cpu") -> tuple[str, str]:
    """(loader name, one-line reason) that `make_loader("auto", ...)` picks.

    CUDA: "resident" when the split (uint8 images + int64 labels) takes at most
    RESIDENT_MAX_FRACTION of the free device memory (`torch.cuda.mem_get_info`); otherwise
    "dali" (it reads the .npy files every prepared directory has), then "ffcv" (needs the
    .beton files), then "cpu". CPU: "resident" -- the split is held in host memory and a batch
    is one gather; bench/loader_epoch.py measured it fastest on raw batches (1.6x ffcv, 4x dali,
    14x the DataLoader baseline) and, with Cut^nMix on the CPU, within run-to-run noise of
    ffcv/dali (the op dominates) and 3-5x faster than the per-sample numpy baseline.
    """
    dev = resolve_device(device)
    man = load_manifest(data_dir)
    if split not in man.counts:
        raise CnmError(f"{man.root}: no split {split!r} (have: {', '.join(man.counts)})")
    need = man.counts[split] * (32 * 32 * 3 + 8)
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 0
    # The back-end checks are passed as callables: importing ffcv or DALI costs seconds (numba
    # compiles at import), and the rule needs them only when the split does not fit on the GPU.
    return auto_rule(dev.type, need, free, lambda: backends.available("nvidia.dali"),
                     lambda: man.has(beton_file(split)) and backends.available("ffcv"), split)


def auto_rule(device_type: str, need_bytes: int, free_bytes: int, dali_ok, ffcv_ok,
              split: str = "train") -> tuple[str, str]:
    """The decision of `choose_auto` from its inputs (a pure function, tested on its own).

    dali_ok / ffcv_ok: bools, or callables returning one, called only when the rule needs them.
    """
    if device_type == "cpu":
        return "resident", "on the CPU the in-memory resident loader is the fastest (bench/loader_epoch.py)"
    size = f"the {split} split ({need_bytes / 2**20:.0f} MiB)"
    if need_bytes <= RESIDENT_MAX_FRACTION * free_bytes:
        return "resident", f"{size} fits in free GPU memory ({free_bytes / 2**30:.1f} GiB)"
    reason = f"{size} is too large for free GPU memory ({free_bytes / 2**30:.1f} GiB)"
    if dali_ok() if callable(dali_ok) else dali_ok:
        return "dali", reason + "; DALI is installed"
    if ffcv_ok() if callable(ffcv_ok) else ffcv_ok:
        return "ffcv", reason + "; FFCV is installed and the .beton exists"
    return "cpu", reason + "; neither DALI nor FFCV is usable"


def make_loader(name: str, data_dir, split: str = "train", batch_size: int = 128, device="cpu",
                seed: int = 0, rank: int = 0, world: int = 1, drop_last: bool | None = None,
                augment=None, limit: int | None = None, **options) -> BatchLoader:
    """Build a loader of `split` of the prepared directory `data_dir` (see the module docstring).

    name: "ffcv" | "dali" | "resident" | "cpu" | "auto". device: "cpu" | "cuda[:N]" | "auto" |
    torch.device. limit: read only the first `limit` samples of the split (resident and cpu).
    Raises a one-line CnmError for an unknown name, a missing back-end (naming the pip extra),
    a limit on a loader that cannot take one, or a missing, corrupt or unknown-version prepared
    directory.
    """
    if not isinstance(name, str) or (name != "auto" and name not in LOADERS):
        raise CnmError(f"unknown loader {name!r} (choices: {', '.join(CHOICES)})")
    auto = name == "auto"
    if auto:
        name, _reason = choose_auto(data_dir, split, device)
    cls = loader_class(name)
    if auto:  # back-end specific options apply only if their back-end was picked
        accepted = inspect.signature(cls.__init__).parameters
        options = {k: v for k, v in options.items() if k in accepted}
    if limit is not None:
        if not cls.can_limit:
            raise CnmError(f"the {name} loader reads its whole split; a limit to the first {limit} samples "
                           f"(--limit-train) works with the resident or cpu loader")
        options["limit"] = limit
    try:
        return cls(data_dir, split=split, batch_size=batch_size, device=device, seed=seed, rank=rank,
                   world=world, drop_last=drop_last, augment=augment, **options)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise CnmError(f"{name} loader: {e}") from None
        raise
