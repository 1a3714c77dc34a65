"""A CPU detector of host syncs: every op that makes the host wait for a device value.

On CUDA such ops block the CPU until the GPU catches up, and inside CUDA-graph capture they are an
error ("operation not permitted when stream is capturing"). A `TorchDispatchMode` sees every aten
op, also those run *inside* other aten ops (a 0-d tensor bound to a `Scalar` argument runs
`_local_scalar_dense`), so a step run on CPU under `SyncDetector` shows what would break capture
without a GPU. Python-level reads that never reach the dispatcher on a CPU tensor (`.cpu()`,
`.numpy()`, `.tolist()`) are caught by wrapping those `Tensor` methods.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops (any overload) whose result, or whose output's shape, needs a device value on the host.
SYNC_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero",
    "aten::equal", "aten::allclose", "aten::masked_select", "aten::unique",
    "aten::_unique", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim",
    "aten::bincount", "aten::histc", "aten::_assert_async", "aten::masked_scatter",
})
# ... and ops that sync in one overload only
SYNC_OVERLOADS = frozenset({"aten::repeat_interleave.Tensor", "aten::repeat_interleave.self_Tensor"})
_INDEXING = frozenset({"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})
# Python-level reads of a tensor's values (a device -> host copy on CUDA)
HOST_READS = ("cpu", "numpy", "tolist", "__array__")


def _sync_name(func, args, kwargs) -> str | None:
    name = func.name()
    full = f"{name}.{func._overloadname}"
    if name in SYNC_OPS or full in SYNC_OVERLOADS:
        return full
    if name in _INDEXING:                       # x[mask]: the mask's count is needed on the host
        idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in idx):
            return f"{full} (boolean mask)"
    if name in ("aten::_to_copy", "aten::copy_"):
        src, dst_dev = (args[0], kwargs.get("device")) if name == "aten::_to_copy" else (args[1], args[0].device)
        if dst_dev is not None and torch.device(dst_dev).type == "cpu" and src.device.type != "cpu":
            return f"{full} (device -> host)"
    return None


class SyncDetector(TorchDispatchMode):
    """Record every host-syncing op run while active; `.ops` lists their names in order."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self._saved: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        hit = _sync_name(func, args, kwargs)
        if hit is not None:
            self.ops.append(hit)
        return func(*args, **kwargs)

    def __enter__(self):
        for n in HOST_READS:
            self._saved[n] = getattr(torch.Tensor, n)
        ops, saved = self.ops, self._saved

        def wrap(n):
            def read(t, *a, **k):
                ops.append(f"Tensor.{n}")
                return saved[n](t, *a, **k)
            return read

        for n in HOST_READS:
            setattr(torch.Tensor, n, wrap(n))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for n, f in self._saved.items():
                setattr(torch.Tensor, n, f)
            self._saved.clear()


def assert_no_sync(fn, *args, **kwargs):
    """Run `fn(*args, **kwargs)` under a `SyncDetector`; fail listing every host-syncing op."""
    with SyncDetector() as det:
        out = fn(*args, **kwargs)
    assert not det.ops, f"host syncs inside the step: {det.ops}"
    return out
