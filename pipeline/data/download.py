"""Download the official CIFAR python tarballs, check the published MD5, keep them in a cache.

Source: https://www.cs.toronto.edu/~kriz/cifar.html (URLs and MD5 sums as published there).
The tarball is streamed to a temporary file next to its final place in the cache, hashed on
the way, and renamed into place only when the size and MD5 match; a failed, interrupted or
corrupt download leaves nothing behind. A cached tarball with the right MD5 is reused, so a
re-run does not download again.

Overrides (for mirrors and tests): `CNM_CIFAR10_URL` / `CNM_CIFAR100_URL` replace the URL,
`CNM_CIFAR10_MD5` / `CNM_CIFAR100_MD5` the expected MD5, `CNM_CACHE_DIR` the cache directory
(default `$XDG_CACHE_HOME/cnm`, else `~/.cache/cnm`).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import shlex
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from pipeline.data.cifar import LAYOUTS, hash_file
from pipeline.errors import CnmError
from pipeline.fileio import atomic_output, os_error_reason, remove_stale_temps

# dataset -> (URL, MD5 published on the CIFAR page)
OFFICIAL = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85"),
}
TIMEOUT_S = 30.0
CHUNK = 1 << 20


def official_url(dataset: str) -> str:
    return os.environ.get(f"CNM_{dataset.upper()}_URL") or OFFICIAL[dataset][0]


def expected_md5(dataset: str) -> str:
    return (os.environ.get(f"CNM_{dataset.upper()}_MD5") or OFFICIAL[dataset][1]).lower()


def default_cache_dir() -> Path:
    if os.environ.get("CNM_CACHE_DIR"):
        return Path(os.environ["CNM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cnm"


def offline_hint(dataset: str, out: str | os.PathLike | None = None) -> str:
    """The two ways on without the download, as commands that keep the user's --out."""
    tarball = LAYOUTS[dataset].tarball
    to = f" --out {shlex.quote(str(out))}" if out is not None else ""
    return (f"download {tarball} yourself and run: cnm prepare --dataset {dataset} --source PATH/{tarball}{to}; "
            f"or work offline with: cnm prepare --dataset synthetic{to}")


def fetch(dataset: str, *, url: str | None = None, md5: str | None = None, cache_dir: str | Path | None = None,
          progress: bool = True, say: Callable[[str], None] | None = None,
          timeout: float = TIMEOUT_S, out: str | os.PathLike | None = None) -> Path:
    """Path of the verified official tarball of `dataset` in the cache, downloading it if needed.

    Every failure (HTTP error, refused or timed-out connection, a body cut short, a wrong MD5,
    an unwritable cache) is a one-line CnmError that says how to continue without the download
    (`out`: the prepared directory asked for, kept in the commands it suggests).
    """
    if dataset not in OFFICIAL:
        raise CnmError(f"--download works for {', '.join(OFFICIAL)}, not {dataset!r}")
    url = url or official_url(dataset)
    md5 = (md5 or expected_md5(dataset)).lower()
    say = say or (lambda msg: None)
    hint = offline_hint(dataset, out)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / LAYOUTS[dataset].tarball
    if target.is_file():
        if hash_file(target, "md5")["md5"] == md5:
            say(f"using the cached {target}")
            return target
        say(f"the cached {target} has the wrong MD5; downloading it again")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if not os.access(cache, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "permission denied")
    except OSError as e:
        raise CnmError(f"{cache}: cannot write the download cache ({os_error_reason(e)}); set CNM_CACHE_DIR "
                       f"to a writable directory, or {hint}") from None
    remove_stale_temps(cache)  # the partial downloads of killed runs
    with atomic_output(target) as tmp:  # a failure, a wrong MD5 or Ctrl-C leaves no partial file
        try:
            with open(tmp, "wb") as f:
                got_md5 = _download(url, f, dataset=dataset, hint=hint, progress=progress, say=say, timeout=timeout)
        except OSError as e:  # writing the cache (a full disk)
            raise CnmError(f"{target}: cannot write the download ({os_error_reason(e)}); {hint}") from None
        if got_md5 != md5:
            raise CnmError(f"{url}: the downloaded file has MD5 {got_md5}, expected {md5} (corrupt, or "
                           f"not the official {LAYOUTS[dataset].tarball}); {hint}")
    say(f"downloaded {target} (MD5 {md5} checked)")
    return target


def _download(url: str, out, *, dataset: str, hint: str, progress: bool, say, timeout: float) -> str:
    """Stream `url` into the open file `out`; returns the MD5 of what was written. Failures are
    one-line CnmErrors ending with `hint`."""
    h = hashlib.md5()
    req = urllib.request.Request(url, headers={"User-Agent": "cnm-prepare/0.1 (python urllib)"})
    say(f"downloading {url}")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise CnmError(f"{url}: download failed: HTTP {e.code} {e.reason}; {hint}") from None
    except urllib.error.URLError as e:
        reason = e.reason.strerror if isinstance(e.reason, OSError) and e.reason.strerror else e.reason
        raise CnmError(f"{url}: cannot connect ({reason}); {hint}") from None
    except TimeoutError:
        raise CnmError(f"{url}: the connection timed out after {timeout:.0f} s; {hint}") from None
    except (http.client.HTTPException, OSError, ValueError) as e:
        raise CnmError(f"{url}: download failed ({e.__class__.__name__}: {e}); {hint}") from None
    with resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        done = 0
        with _Bar(total, LAYOUTS[dataset].tarball, enabled=progress) as bar:
            while True:
                try:
                    block = resp.read(CHUNK)
                except http.client.IncompleteRead as e:
                    done += len(e.partial)
                    raise CnmError(f"{url}: the download was cut short after {done} of "
                                   f"{total if total is not None else '?'} bytes; {hint}") from None
                except TimeoutError:
                    raise CnmError(f"{url}: the connection stalled for {timeout:.0f} s after {done} "
                                   f"bytes; {hint}") from None
                except (http.client.HTTPException, ConnectionError) as e:
                    raise CnmError(f"{url}: the download broke off after {done} bytes "
                                   f"({e.__class__.__name__}); {hint}") from None
                if not block:
                    break
                out.write(block)
                h.update(block)
                done += len(block)
                bar.advance(len(block))
        if total is not None and done != total:
            raise CnmError(f"{url}: the download was cut short after {done} of {total} bytes; {hint}")
    return h.hexdigest()


class _Bar:
    """A rich progress bar (bytes, speed, time left) on stdout; silent when disabled."""

    def __init__(self, total: int | None, name: str, enabled: bool):
        self.total, self.name, self.enabled = total, name, enabled
        self.progress = None

    def __enter__(self):
        if self.enabled:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn())
            self.progress.start()
            self.task = self.progress.add_task(self.name, total=self.total)
        return self

    def advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
        return False
