"""Prepared directories whose pixels encode the sample index, shared by the loader tests.

Image i of a split is random uint8 noise (seeded) except pixel (0, 0), whose red and green
bytes hold i % 256 and i // 256, so `sample_ids(images)` recovers every sample's index from a
batch exactly; its label is `label_of(i)`, so a test can check that each image kept its label.
The directories include FFCV .beton files when ffcv is installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.manifest import write_dataset

NUM_CLASSES = 10
TRAIN_N = 250
TEST_N = 103
TINY_TRAIN_N = 5
TINY_TEST_N = 3


def label_of(index) -> np.ndarray:
    return (np.asarray(index) * 7 + 3) % NUM_CLASSES


def indexed_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n,32,32,3], labels int64 [n]) with the index in pixel (0,0)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    idx = np.arange(n)
    images[:, 0, 0, 0] = idx % 256
    images[:, 0, 0, 1] = idx // 256
    return images, label_of(idx).astype(np.int64)


def sample_ids(images: torch.Tensor) -> torch.Tensor:
    """int64 [B]: the index encoded in each image of a uint8 [B,32,32,3] batch (any device)."""
    px = images[:, 0, 0].long().cpu()
    return px[:, 0] + 256 * px[:, 1]


def write_indexed(path, train_n: int, test_n: int):
    return write_dataset(path, {"train": indexed_split(train_n, 1), "test": indexed_split(test_n, 2)},
                         dataset="indexed", class_names=[f"c{i}" for i in range(NUM_CLASSES)])


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """Prepared dir: train 250, test 103 images (with betons where ffcv is installed)."""
    return write_indexed(tmp_path_factory.mktemp("loaders") / "data", TRAIN_N, TEST_N).root


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Prepared dir smaller than one batch: train 5, test 3 images."""
    return write_indexed(tmp_path_factory.mktemp("loaders") / "tiny", TINY_TRAIN_N, TINY_TEST_N).root


def collect(loader, epoch: int | None = None):
    """(ids int64 [n], labels int64 [n], batch sizes, first batch) of one epoch, copied out.

    Copies matter: FFCV reuses its output buffers.
    """
    if epoch is not None:
        loader.set_epoch(epoch)
    ids, labels, sizes, first = [], [], [], None
    for images, y in loader:
        if first is None:
            first = (images.clone(), y.clone())
        ids.append(sample_ids(images))
        labels.append(y.cpu().clone())
        sizes.append(len(y))
    if not ids:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), sizes, first
    return torch.cat(ids), torch.cat(labels), sizes, first
