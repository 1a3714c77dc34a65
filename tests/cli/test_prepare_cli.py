"""`cnm prepare` from the command line: every bad input of issue 2 gives exit != 0, exactly one
line on stderr starting with "error:", no traceback and no partial output. Most cases run
`cnm.cli.main` in-process (fast); a representative set runs `python -m cnm` in a subprocess
(the real interpreter, exit status and streams), including a real Ctrl-C."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnm.cli import main
from tests import cifar_fakes as fakes

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- helpers


def run_inproc(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def run_sub(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 120):
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.run([sys.executable, "-m", "cnm", *args], check=False, capture_output=True, text=True, env=full_env,
                       cwd=cwd, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(code: int, out: str, err: str, *words: str) -> str:
    assert code not in (0, None), (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


# ----------------------------------------------------------------------------- sources


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> dict[str, Path]:
    """Every bad (and one good) source, built once."""
    tmp = tmp_path_factory.mktemp("sources")
    s: dict[str, Path] = {"tmp": tmp}
    s["good10"], _ = fakes.make_release(tmp / "good10", "cifar10", 20, 10)
    s["good100"], _ = fakes.make_release(tmp / "good100", "cifar100", 20, 10)
    s["folder10"], _ = fakes.make_release(tmp / "folder10", "cifar10", 20, 10, tarball=False)
    s["marker"] = tmp / "pwned"
    s["evil"], _ = fakes.make_release(
        tmp / "evil", "cifar10", 20, 10,
        hook=lambda n, d: fakes.malicious_pickle(s["marker"]) if n == "data_batch_1" else d)
    s["shape"], _ = fakes.make_release(
        tmp / "shape", "cifar100", 20, 10,
        hook=lambda n, d: {**d, b"data": d[b"data"][:, :3000]} if n == "train" else d)
    s["range"], _ = fakes.make_release(
        tmp / "range", "cifar10", 20, 10,
        hook=lambda n, d: {**d, b"labels": [12] * len(d[b"labels"])} if n == "test_batch" else d)
    s["text"] = tmp / "notes.tar.gz"
    s["text"].write_text("not an archive\n" * 100)
    data = s["good100"].read_bytes()
    s["truncated"] = tmp / "truncated" / "cifar-100-python.tar.gz"
    s["truncated"].parent.mkdir()
    s["truncated"].write_bytes(data[: len(data) // 2])
    return s


@pytest.fixture(scope="module")
def server(src):
    body = src["good10"].read_bytes()
    routes = {"/ok.tar.gz": body, "/missing.tar.gz": 404, "/cut.tar.gz": ("cut", body, len(body) // 4)}
    with fakes.http_server(routes) as (url, hits):
        yield url, hits, hashlib.md5(body).hexdigest()


BAD = {
    # name: (args with {placeholders}, words in the message)
    "missing path": (["--dataset", "cifar10", "--source", "{tmp}/nope.tar.gz"], ["no such file"]),
    "not a tarball": (["--dataset", "cifar10", "--source", "{text}"], ["not a tar archive"]),
    "truncated tarball": (["--dataset", "cifar100", "--source", "{truncated}", "--lenient"], ["truncated"]),
    "cifar10 as cifar100": (["--dataset", "cifar100", "--source", "{good10}", "--lenient"],
                            ["--dataset cifar10"]),
    "cifar100 as cifar10": (["--dataset", "cifar10", "--source", "{good100}", "--lenient"],
                            ["--dataset cifar100"]),
    "cifar10 folder as cifar100": (["--dataset", "cifar100", "--source", "{folder10}", "--lenient"],
                                   ["--dataset cifar10"]),
    "wrong-shaped data": (["--dataset", "cifar100", "--source", "{shape}", "--lenient"], ["train", "3072"]),
    "out-of-range labels": (["--dataset", "cifar10", "--source", "{range}", "--lenient"],
                            ["test_batch", "12", "0..9"]),
    "malicious pickle": (["--dataset", "cifar10", "--source", "{evil}", "--lenient"],
                         ["data_batch_1", "refusing to unpickle", "system"]),
    "unofficial counts": (["--dataset", "cifar10", "--source", "{good10}"], ["--lenient"]),
    "source and download": (["--dataset", "cifar10", "--source", "{good10}", "--download"], ["not both"]),
    "neither source nor download": (["--dataset", "cifar100"], ["--source PATH", "--download"]),
    "source with synthetic": (["--dataset", "synthetic", "--source", "{good10}"], ["--dataset synthetic"]),
    "synthetic flag with cifar": (["--dataset", "cifar10", "--download", "--num-classes", "5"],
                                  ["--num-classes only apply"]),
    "bad synthetic size": (["--dataset", "synthetic", "--train-size", "0"], ["--train-size"]),
}


def _args(template: list[str], src: dict) -> list[str]:
    return [a.format(**{k: str(v) for k, v in src.items()}) for a in template]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_in_process(case, src, tmp_path, capsys):
    template, words = BAD[case]
    out = tmp_path / "out"
    code, stdout, stderr = run_inproc(capsys, "prepare", *_args(template, src), "--out", str(out))
    assert_one_line_error(code, stdout, stderr, *words)
    assert_no_output(out)
    assert not src["marker"].exists()


@pytest.mark.parametrize("case", ["missing path", "truncated tarball", "malicious pickle", "cifar10 as cifar100",
                                  "neither source nor download"])
def test_bad_input_subprocess(case, src, tmp_path):
    template, words = BAD[case]
    out = tmp_path / "out"
    code, stdout, stderr = run_sub("prepare", *_args(template, src), "--out", str(out))
    assert code == 1
    assert_one_line_error(code, stdout, stderr, *words)
    assert_no_output(out)
    assert not src["marker"].exists()


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create entries in (chmod; /sys when running as root)."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        (d / "probe").mkdir()
    except OSError:
        return d
    (d / "probe").rmdir()  # root ignores permission bits: use a file system that refuses
    try:
        os.mkdir("/sys/cnm-probe")
    except OSError:
        return Path("/sys")
    os.rmdir("/sys/cnm-probe")
    pytest.skip("no unwritable directory available to this user")


def test_unwritable_output_directory(src, tmp_path):
    parent = _unwritable_dir(tmp_path)
    out = parent / "cnm-test-out"
    code, stdout, stderr = run_sub("prepare", "--dataset", "cifar10", "--source", str(src["good10"]), "--lenient",
                                   "--out", str(out))
    assert_one_line_error(code, stdout, stderr, str(out), "cannot create the output directory")
    assert not out.exists()


def test_existing_output_without_force(src, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = run_inproc(capsys, "prepare", "--dataset", "synthetic", "--num-classes", "3", "--train-size",
                            "9", "--test-size", "3", "--no-beton", "--out", str(out))
    assert code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, stdout, stderr = run_sub("prepare", "--dataset", "cifar10", "--source", str(src["good10"]), "--lenient",
                                   "--out", str(out))
    assert_one_line_error(code, stdout, stderr, "already exists", "--force")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("route,words", [("/missing.tar.gz", ["HTTP 404"]), ("/cut.tar.gz", ["cut short"]),
                                         ("wrong-md5", ["MD5"]), ("refused", ["cannot connect"])])
def test_download_failures(server, tmp_path, capsys, monkeypatch, route, words):
    url, _, _ = server
    if route == "wrong-md5":
        target = f"{url}/ok.tar.gz"  # served fine, but it is not the official file
    elif route == "refused":
        target = f"http://127.0.0.1:{fakes.closed_port()}/cifar-10-python.tar.gz"
    else:
        target = f"{url}{route}"
    monkeypatch.setenv("CNM_CIFAR10_URL", target)
    monkeypatch.setenv("CNM_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code, stdout, stderr = run_inproc(capsys, "prepare", "--dataset", "cifar10", "--download", "--out", str(out))
    line = assert_one_line_error(code, stdout, stderr, *words)
    assert "--source" in line and "--dataset synthetic" in line
    # the advice keeps the user's --out
    assert f"cnm prepare --dataset cifar10 --source PATH/cifar-10-python.tar.gz --out {out};" in line
    assert line.endswith(f"cnm prepare --dataset synthetic --out {out}")
    assert_no_output(out)
    assert list((tmp_path / "cache").iterdir()) == []


def test_download_failure_subprocess(server, tmp_path):
    url, _, _ = server
    env = {"CNM_CIFAR10_URL": f"{url}/missing.tar.gz", "CNM_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "out"
    code, stdout, stderr = run_sub("prepare", "--dataset", "cifar10", "--download", "--out", str(out), env=env)
    assert code == 1
    assert_one_line_error(code, stdout, stderr, "HTTP 404", "--source", "--dataset synthetic")
    assert_no_output(out)


def test_download_success_then_up_to_date(server, tmp_path, capsys, monkeypatch):
    url, hits, good_md5 = server
    monkeypatch.setenv("CNM_CIFAR10_URL", f"{url}/ok.tar.gz")
    monkeypatch.setenv("CNM_CIFAR10_MD5", good_md5)
    monkeypatch.setenv("CNM_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    args = ["prepare", "--dataset", "cifar10", "--download", "--lenient", "--no-beton", "--out", str(out)]
    code, stdout, stderr = run_inproc(capsys, *args)
    assert code == 0, stderr
    assert "prepared cifar10" in stdout and "train_images.npy" in stdout
    assert stderr.count("warning:") == 2 and "Traceback" not in stderr
    n = hits["/ok.tar.gz"]
    code, stdout, stderr = run_inproc(capsys, *args)
    assert code == 0 and "up to date" in stdout and hits["/ok.tar.gz"] == n


# ----------------------------------------------------------------------------- success and re-run


def test_synthetic_subprocess_and_rerun(tmp_path):
    out = tmp_path / "syn"
    args = ["prepare", "--dataset", "synthetic", "--num-classes", "5", "--train-size", "50", "--test-size", "10",
            "--seed", "1", "--no-beton", "--out", str(out)]
    code, stdout, stderr = run_sub(*args)
    assert code == 0 and stderr == "", stderr
    assert f"prepared synthetic in {out}" in stdout and "50 train + 10 test images, 5 classes" in stdout
    code, stdout, stderr = run_sub(*args)
    assert code == 0 and "up to date" in stdout and "verified 4 files by sha256" in stdout


def test_default_out_is_data_dataset(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, _ = run_inproc(capsys, "prepare", "--dataset", "synthetic", "--num-classes", "2",
                                 "--train-size", "4", "--test-size", "2", "--no-beton")
    assert code == 0 and (tmp_path / "data" / "synthetic" / "manifest.json").is_file()


def _interrupt_mid_write(out: Path, sig: int):
    """Run `cnm prepare` into `out`, freeze it (SIGSTOP) as soon as it says it is writing, and
    if its temporary directory exists then, send `sig` and resume it. Returns (caught mid-write,
    exit status, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cnm", "prepare", "--dataset", "synthetic", "--train-size",
                             "12000", "--test-size", "2000", "--no-beton", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if line.startswith("writing"):
                proc.send_signal(signal.SIGSTOP)
                break
            assert time.monotonic() < deadline
        caught = any(p.name.startswith(f".{out.name}.tmp-") for p in out.parent.iterdir())
        if caught:
            proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return caught, proc.returncode, stdout, stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_while_writing_leaves_nothing(tmp_path, sig):
    """A real SIGINT (Ctrl-C) or SIGTERM while the output is half written (its temporary
    directory exists): exit 130 and no trace of the output. A run that finished before it could
    be frozen proves nothing and is retried (up to three times)."""
    for attempt in range(3):
        out = tmp_path / f"syn{attempt}"
        caught, code, stdout, stderr = _interrupt_mid_write(out, sig)
        if caught:
            break
        assert code == 0, stderr
    assert caught, "the child was never caught mid-write"
    assert code == 130, stderr
    assert "Traceback" not in stdout + stderr and stderr.strip() == "interrupted"
    assert_no_output(out)
