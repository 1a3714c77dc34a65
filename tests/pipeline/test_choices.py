"""pipeline.choices: the one declaration of the shared choice tuples agrees with the code that
implements each choice (the mix modes of the op, the loader registry)."""

from __future__ import annotations

import subprocess
import sys

from pipeline import choices, loaders
from pipeline.ops import params


def test_choices_match_their_implementations():
    assert choices.MIX_MODES == params.MODES
    assert choices.BOX_MODES == params.BOX_MODES
    assert choices.LOADER_NAMES == tuple(loaders.LOADERS)
    assert set(choices.BOX_MODES) < set(choices.MIX_MODES)


def test_choices_import_no_torch():
    code = "import sys, pipeline.choices; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
