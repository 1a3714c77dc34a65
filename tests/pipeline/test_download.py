"""Downloads against a web server on 127.0.0.1: success and cache, and every failure mode
(404, a body cut short, a wrong MD5, a refused connection) as one line with nothing left behind."""

from __future__ import annotations

import hashlib
import os
import subprocess

import numpy as np
import pytest

from pipeline import fileio
from pipeline.data import download
from pipeline.data.manifest import load_manifest
from pipeline.data.prepare import prepare
from pipeline.errors import CnmError
from tests import cifar_fakes as fakes


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("release")
    tar, arrays = fakes.make_release(tmp, "cifar10", 20, 10, seed=8)
    return tar.read_bytes(), arrays


@pytest.fixture(scope="module")
def server(release):
    body, _ = release
    routes = {"/ok.tar.gz": body, "/missing.tar.gz": 404, "/cut.tar.gz": ("cut", body, len(body) // 3),
              "/broken.tar.gz": 500}
    with fakes.http_server(routes) as (url, hits):
        yield url, hits


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def cache_entries(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_official_urls_and_md5s():
    assert download.OFFICIAL["cifar10"] == ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                                            "c58f30108f718f92721af3b95e74349a")
    assert download.OFFICIAL["cifar100"] == ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                                             "eb9058c3a382ffc7106e4002c42a8d85")


def test_env_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("CNM_CIFAR100_URL", "http://127.0.0.1:1/x.tgz")
    monkeypatch.setenv("CNM_CIFAR100_MD5", "ABC")
    monkeypatch.setenv("CNM_CACHE_DIR", str(tmp_path))
    assert download.official_url("cifar100") == "http://127.0.0.1:1/x.tgz"
    assert download.expected_md5("cifar100") == "abc"
    assert download.default_cache_dir() == tmp_path
    monkeypatch.delenv("CNM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert download.default_cache_dir() == tmp_path / "xdg" / "cnm"


def test_download_verifies_md5_and_caches(server, release, tmp_path):
    url, hits = server
    body, _ = release
    cache = tmp_path / "cache"
    said = []
    path = download.fetch("cifar10", url=f"{url}/ok.tar.gz", md5=md5(body), cache_dir=cache, progress=False,
                          say=said.append)
    assert path == cache / "cifar-10-python.tar.gz" and path.read_bytes() == body
    assert cache_entries(cache) == ["cifar-10-python.tar.gz"]
    n = hits["/ok.tar.gz"]
    again = download.fetch("cifar10", url=f"{url}/ok.tar.gz", md5=md5(body), cache_dir=cache, progress=False,
                           say=said.append)
    assert again == path and hits["/ok.tar.gz"] == n  # served from the cache
    assert any("using the cached" in s for s in said)


def test_partial_download_of_a_killed_run_is_removed(server, release, tmp_path):
    """A run killed outright leaves its temporary download; the next fetch removes it (its writer
    is dead), but not one of a process that still runs."""
    url, _ = server
    body, _ = release
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.Popen(["true"])  # its pid is free once it has been waited for
    dead.wait()
    stale = cache / f".cifar-10-python.tar.gz.tmp-{fileio.host_tag()}-{dead.pid}-0123abcd"
    live = cache / f".cifar-10-python.tar.gz.tmp-{fileio.host_tag()}-{os.getppid()}-4567abcd"
    stale.write_bytes(b"half a tarball")
    live.write_bytes(b"being written")
    download.fetch("cifar10", url=f"{url}/ok.tar.gz", md5=md5(body), cache_dir=cache, progress=False)
    assert cache_entries(cache) == sorted([live.name, "cifar-10-python.tar.gz"])


def test_cached_file_with_wrong_md5_is_fetched_again(server, release, tmp_path):
    url, hits = server
    body, _ = release
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cifar-10-python.tar.gz").write_bytes(b"stale")
    n = hits["/ok.tar.gz"]
    path = download.fetch("cifar10", url=f"{url}/ok.tar.gz", md5=md5(body), cache_dir=cache, progress=False)
    assert path.read_bytes() == body and hits["/ok.tar.gz"] == n + 1


def test_progress_bar_does_not_break_the_download(server, release, tmp_path):
    url, _ = server
    body, _ = release
    path = download.fetch("cifar10", url=f"{url}/ok.tar.gz", md5=md5(body), cache_dir=tmp_path, progress=True)
    assert path.read_bytes() == body


@pytest.mark.parametrize("route,words", [
    ("/missing.tar.gz", ["HTTP 404"]),
    ("/broken.tar.gz", ["HTTP 500"]),
    ("/cut.tar.gz", ["cut short"]),
    ("/ok.tar.gz", ["MD5", "expected 00000000000000000000000000000000"]),
    (None, ["cannot connect"]),
])
def test_failures_are_one_line_with_the_way_out(server, tmp_path, route, words):
    url, _ = server
    target = f"{url}{route}" if route else f"http://127.0.0.1:{fakes.closed_port()}/x.tar.gz"
    cache = tmp_path / "cache"
    with pytest.raises(CnmError) as e:
        download.fetch("cifar10", url=target, md5="0" * 32, cache_dir=cache, progress=False, timeout=10)
    msg = str(e.value)
    assert "\n" not in msg and target in msg
    for w in words:
        assert w in msg, msg
    assert "--source" in msg and "--dataset synthetic" in msg
    assert cache_entries(cache) == []  # no partial download, no temp file


def test_unwritable_cache_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CnmError, match="cannot write the download cache.*CNM_CACHE_DIR"):
        download.fetch("cifar10", url="http://127.0.0.1:1/x", cache_dir=blocker / "cache", progress=False)


def test_prepare_with_download(server, release, tmp_path, monkeypatch):
    url, hits = server
    body, arrays = release
    monkeypatch.setenv("CNM_CIFAR10_URL", f"{url}/ok.tar.gz")
    monkeypatch.setenv("CNM_CIFAR10_MD5", md5(body))
    out, cache = tmp_path / "out", tmp_path / "cache"
    res = prepare("cifar10", out, download=True, lenient=True, cache_dir=cache, beton=False, progress=False)
    assert res.status == "written"
    man = load_manifest(out, verify=True)
    np.testing.assert_array_equal(man.load_split("train")[0], arrays["train"][0])
    assert man.source["url"] == f"{url}/ok.tar.gz" and man.source["md5"] == md5(body)
    # a re-run finds the output up to date without touching the network
    n = hits["/ok.tar.gz"]
    again = prepare("cifar10", out, download=True, lenient=True, cache_dir=cache, progress=False)
    assert again.status == "up-to-date" and hits["/ok.tar.gz"] == n


def test_prepare_download_failure_leaves_nothing(server, tmp_path, monkeypatch):
    url, _ = server
    monkeypatch.setenv("CNM_CIFAR10_URL", f"{url}/missing.tar.gz")
    out = tmp_path / "out"
    with pytest.raises(CnmError, match="HTTP 404"):
        prepare("cifar10", out, download=True, cache_dir=tmp_path / "cache", progress=False)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["cache"]
    assert cache_entries(tmp_path / "cache") == []
