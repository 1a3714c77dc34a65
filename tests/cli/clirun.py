"""`cnm ARGV` run in the test's process, for CLI tests."""

from __future__ import annotations

import pytest

from cnm.cli import main


def run_main(argv, capsys):
    """(exit code, stdout, stderr) of `cnm ARGV` (every item str()'d)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


# optional packages the GPU box does not have: a child that runs this code first fails to import them
BLOCKER = '''
import importlib.abc, sys
BLOCK = {"ffcv", "nvidia", "scipy", "numba", "llvmlite", "psutil", "matplotlib", "cv2"}
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU box)")
sys.meta_path.insert(0, _Block())
'''
