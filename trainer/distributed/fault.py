"""The `CNM_FAULT` testing hook: make one rank fail at one step (tests/trainer/test_distributed.py).

`CNM_FAULT="RANK:EPOCH:STEP[:raise|exit|hang]"`: process RANK fails before step STEP (1-based) of
epoch EPOCH (1-based, as in metrics.jsonl): raise an exception, exit hard (`os._exit`, as an OOM
kill would), or hang. See docs/distributed.md#failures.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.errors import CnmError

FAULT_ENV = "CNM_FAULT"
FAULT_KINDS = ("raise", "exit", "hang")


@dataclass(frozen=True)
class FaultInjector:
    """`CNM_FAULT="RANK:EPOCH:STEP[:KIND]"`: this rank fails at that step."""

    epoch: int        # 1-based
    step: int         # 1-based within the epoch
    kind: str         # raise | exit | hang
    rank: int

    @classmethod
    def from_env(cls, rank: int, environ: Mapping[str, str] | None = None) -> FaultInjector | None:
        """The injector for `rank`, or None (variable unset, or naming another rank)."""
        spec = (os.environ if environ is None else environ).get(FAULT_ENV, "").strip()
        if not spec:
            return None
        parts = spec.split(":")
        try:
            if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] not in FAULT_KINDS):
                raise ValueError
            r, e, s = (int(v) for v in parts[:3])
        except ValueError:
            raise CnmError(f"{FAULT_ENV}={spec!r}: expected RANK:EPOCH:STEP[:{'|'.join(FAULT_KINDS)}]") from None
        if r != rank:
            return None
        return cls(e, s, parts[3] if len(parts) == 4 else "raise", rank)

    def check(self, epoch0: int, step0: int) -> None:
        """Call before step `step0` (0-based) of epoch `epoch0` (0-based)."""
        if (epoch0 + 1, step0 + 1) != (self.epoch, self.step):
            return
        where = f"rank {self.rank}, epoch {self.epoch}, step {self.step}"
        if self.kind == "exit":
            os.write(2, f"{FAULT_ENV}: hard exit at {where}\n".encode())
            os._exit(17)
        if self.kind == "hang":
            os.write(2, f"{FAULT_ENV}: hanging at {where}\n".encode())
            while True:
                time.sleep(3600)
        raise RuntimeError(f"{FAULT_ENV}: injected failure at {where}")
