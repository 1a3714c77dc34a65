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
