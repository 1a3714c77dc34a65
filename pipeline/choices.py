"""The choices that several layers offer, declared once (no torch import: `trainer/config.py`
builds `cnm train --help` from them without loading torch).

See docs/cli.md for what each choice does.
"""

from __future__ import annotations

MIX_MODES = ("cutnmix", "cutmix", "mixup", "none")  # Cut^nMix modes (pipeline.ops.params)
BOX_MODES = ("cutnmix", "cutmix")                    # the modes that paste a box
LOADER_NAMES = ("resident", "dali", "ffcv", "cpu")   # pipeline.loaders.LOADERS, in its order
DEVICES = ("auto", "cuda", "cpu")
PEER_EXECS = ("auto", "loop", "grouped")           # --peer-exec; trainer.peers runs the last two                    # what pipeline.loaders.base.resolve_device is given by the CLI
