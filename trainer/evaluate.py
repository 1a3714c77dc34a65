"""Test-split evaluation of a peer ensemble and its EMA teacher (docs/design.md#evaluation, `cnm eval`).

Reported accuracies (top-1, %):

- `test_acc`             [P] every peer on the plain test image (no augmentation);
- `ensemble_acc`         the peer ensemble: argmax of the MEAN OF SOFTMAX probabilities of the
                         P peers (probability averaging, as the ensemble results of ONE/OKDDip;
                         unlike logit averaging it does not let one over-confident peer dominate);
- `teacher_acc`          [P] every EMA teacher peer (when the run has an EMA teacher);
- `teacher_ensemble_acc` the same probability average over the EMA peers;
- `disagreement`         how diverse the peers are: the % of test images on which two peers'
                         top-1 predictions differ, mean over the P(P-1)/2 pairs (None for P = 1).
                         An ensemble can only gain where its members disagree.

Test images are normalised exactly as the Cut^nMix op normalises training views
(`(float32(p) - mean) * (1/std)` per channel) and fed to every peer. The uint8 test split is
copied to the device once; correct counts accumulate on the device and are read once at the end
(optionally reduced across processes through `reduce`, for DDP). BatchNorm uses running stats
(eval mode); the train/eval mode of the models is restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from pipeline.data.manifest import load_manifest
from pipeline.errors import CnmError
from pipeline.fileio import atomic_write_json
from trainer import checkpoint as ckpt
from trainer.peers import build_peers


def normalise(images_u8: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor,
              channels_last: bool) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float32 [B,3,H,W] ((p - mean) * inv_std; channels-last memory when asked)."""
    x = (images_u8.float() - mean) * inv_std          # [B,H,W,3]
    x = x.permute(0, 3, 1, 2)                          # NCHW view of NHWC memory = channels-last
    return x if channels_last else x.contiguous()


class Evaluator:
    """Holds the (sharded) test split on the device; `__call__(peerset, teacher)` -> accuracies.

    images uint8 [N,32,32,3] and labels int64 [N] (numpy or torch); rank/world take every
    world-th sample starting at rank (the caller reduces counts across ranks with `reduce`).
    """

    def __init__(self, images, labels, *, mean, std, device="cpu", bf16: bool = False,
                 channels_last: bool = False, batch_size: int = 1000, rank: int = 0, world: int = 1,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.device = torch.device(device)
        images = torch.as_tensor(np.array(images[rank::world]) if isinstance(images, np.ndarray)
                                 else images[rank::world])
        labels = torch.as_tensor(np.array(labels[rank::world]) if isinstance(labels, np.ndarray)
                                 else labels[rank::world])
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.mean = torch.tensor(np.float32(mean), device=self.device)
        self.inv_std = torch.tensor((1.0 / np.asarray(std, np.float64)).astype(np.float32), device=self.device)
        self.bf16 = bf16
        self.channels_last = channels_last
        self.batch_size = batch_size
        self.reduce = reduce

    @classmethod
    def from_manifest(cls, manifest, **kw) -> Evaluator:
        images, labels = manifest.load_split("test")
        return cls(images, labels, mean=manifest.mean, std=manifest.std, **kw)

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def __call__(self, peerset: nn.Module, teacher: nn.Module | None = None) -> dict:
        nets = [peerset] + ([teacher] if teacher is not None else [])
        modes = [n.training for n in nets]
        for n in nets:
            n.eval()
        P = int(peerset.peers)
        # counts: [peer correct x P, ensemble, teacher correct x P, teacher ensemble,
        #          peer pairs that disagree (summed over pairs), total]
        counts = torch.zeros(2 * P + 4, dtype=torch.float64, device=self.device)
        pairs = torch.triu_indices(P, P, offset=1, device=self.device)   # [2, P(P-1)/2]
        try:
            for i in range(0, len(self.labels), self.batch_size):
                x = normalise(self.images[i:i + self.batch_size], self.mean, self.inv_std, self.channels_last)
                y = self.labels[i:i + self.batch_size]
                views = x.unsqueeze(0).expand(P, *x.shape)
                for j, net in enumerate(nets):
                    with self._autocast():
                        logits, _ = net(views)
                    logits = logits.float()                               # [P,B,K]
                    pred = logits.argmax(-1)                              # [P,B]
                    hit = (pred == y).sum(1)                              # [P]
                    ens = (logits.softmax(-1).mean(0).argmax(-1) == y).sum()
                    off = j * (P + 1)
                    counts[off:off + P] += hit
                    counts[off + P] += ens
                    if j == 0:
                        counts[-2] += (pred[pairs[0]] != pred[pairs[1]]).sum()
                counts[-1] += y.shape[0]
            if self.reduce is not None:
                counts = self.reduce(counts)
            c = counts.cpu().tolist()
        finally:
            for n, m in zip(nets, modes):
                n.train(m)
        total = max(c[-1], 1.0)
        out = {"test_acc": [100.0 * v / total for v in c[:P]], "ensemble_acc": 100.0 * c[P] / total}
        if teacher is not None:
            out["teacher_acc"] = [100.0 * v / total for v in c[P + 1:2 * P + 1]]
            out["teacher_ensemble_acc"] = 100.0 * c[2 * P + 1] / total
        out["disagreement"] = 100.0 * c[-2] / (total * (P * (P - 1) // 2)) if P > 1 else None
        out["test_images"] = int(c[-1])
        return out


def evaluate_checkpoint(run_or_checkpoint, *, data: str | None = None, device: str = "auto",
                        batch_size: int = 1000, write: bool = True) -> dict:
    """Evaluate a run directory (its best.pt, else last.pt) or a checkpoint file.

    Returns the accuracies (as `Evaluator.__call__`) plus `checkpoint`, `epoch`, `archs`, `data`,
    and writes them to `eval-<checkpoint name>.json` next to the checkpoint (atomically) when
    `write`, so evaluating best.pt and last.pt keeps both. The checkpoint is verified against
    its checksum first. One-line CnmError for a missing/corrupt/foreign checkpoint, a missing or mismatching data dir, or
    `--device cuda` without CUDA.
    """
    if batch_size < 1:
        raise CnmError(f"--batch-size must be >= 1, got {batch_size}")
    path = ckpt.find_checkpoint(run_or_checkpoint)
    state = ckpt.load_checkpoint(path, keys=ckpt.EVAL_KEYS)
    cfg = state.get("config", {})
    data_dir = data if data is not None else cfg.get("data")
    if data_dir is None:
        raise CnmError(f"{path}: the checkpoint names no dataset; pass --data DIR")
    manifest = load_manifest(data_dir)
    if manifest.num_classes != state["num_classes"]:
        raise CnmError(f"{data_dir}: {manifest.num_classes} classes, but the checkpoint's models have "
                       f"{state['num_classes']}")
    if device == "cuda" and not torch.cuda.is_available():
        raise CnmError("--device cuda: no CUDA device is available; use --device cpu")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    archs = list(state["archs"])
    peers = build_peers(archs, state["num_classes"], peer_exec="loop")
    ckpt.check_peer_states(peers, state["peers"], str(path))
    peers.load_peer_state_dicts(state["peers"])
    teacher = None
    if state.get("teacher") is not None:
        teacher = build_peers(archs, state["num_classes"], peer_exec="loop")
        ckpt.check_peer_states(teacher, state["teacher"], f"{path} (EMA teacher)")
        teacher.load_peer_state_dicts(state["teacher"])
        teacher = teacher.to(dev)
    peers = peers.to(dev)
    on_cuda = dev.type == "cuda"
    if on_cuda:
        peers = peers.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last) if teacher is not None else None
    evaluator = Evaluator.from_manifest(manifest, device=dev, bf16=False, channels_last=on_cuda,
                                        batch_size=batch_size)
    result = evaluator(peers, teacher)
    result.update(checkpoint=str(path), epoch=int(state["epoch"]), archs=archs, data=str(data_dir),
                  dataset=manifest.dataset, device=str(dev))
    out = ckpt.eval_path(path)
    result["eval_json"] = str(out)
    if write:
        atomic_write_json(out, result)
    return result
