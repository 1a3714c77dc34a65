"""The README's first two commands are the contract with users and CI: keep them true."""

import re
from pathlib import Path

from trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)]


def test_ci_runs_exactly_the_readme_test_command():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    test_command = blocks[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci, f"{test_command!r} is not a line of .ci/run"


def test_main_job_prepares_where_train_reads_by_default():
    main_job = _bash_blocks((ROOT / "README.md").read_text())[0]
    assert "cnm train --arch resnet32 --peers 3" in main_job
    out = re.search(r"cnm prepare --dataset cifar100 --download --out (\S+)", main_job)
    assert out is not None
    assert Path(out.group(1)) == Path(TrainConfig().data)
    assert main_job.startswith("bash setup.sh")
