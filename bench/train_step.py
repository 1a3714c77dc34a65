"""The train step of `cnm train`, ready to time: `build_bench_step(...) -> BenchStep`.

`build_bench_step(arch, peers, peer_exec, device, bf16, channels_last, cuda_graphs,
batch_size=128, num_classes=100, mix="cutnmix", teacher="ema", fml=True, seed=0)` builds the
peers, EMA teacher, Cut^nMix op and a `trainer.step.TrainStep` with the default recipe (ramp
weight 1, so every loss term is computed). `b(images, labels)` runs one step on a uint8
[B,32,32,3] device batch without synchronising; `b.images`/`b.labels` hold one random batch,
`b.run(n)` runs n steps on it, `b.sync()` waits for the device, `b.close()` drops the CUDA graph:

    from bench.train_step import build_bench_step
    b = build_bench_step("resnet32", 3, "grouped", "cuda", bf16=True, channels_last=True, cuda_graphs=True)
    b.run(20); b.sync()                      # warm-up (the first step captures the graph)
    t0 = time.perf_counter(); b.run(200); b.sync(); dt = time.perf_counter() - t0
    print(200 * b.images_per_step / dt, "images/s")
"""

from __future__ import annotations

import torch

from trainer.peers import build_peers
from trainer.step import LossSetup, TrainStep, build_augment
from trainer.teacher import EMATeacher


class BenchStep:
    """A TrainStep for throughput measurements: `bench_step(images, labels)` runs one train step
    (no host sync; the first call captures the CUDA graph when enabled). `.images`/`.labels` hold
    one random uint8 batch on the device; `run(n)` does n steps on it; `sync()` waits for the
    device; `close()` drops the graph."""

    def __init__(self, step: TrainStep, images: torch.Tensor, labels: torch.Tensor):
        self.step, self.images, self.labels = step, images, labels
        self.images_per_step = int(images.shape[0])
        self._i = 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.step(images, labels, epoch=0, step=self._i)
        self._i += 1

    def run(self, n: int) -> None:
        for _ in range(n):
            self(self.images, self.labels)

    def sync(self) -> None:
        if self.step.device.type == "cuda":
            torch.cuda.synchronize(self.step.device)

    def close(self) -> None:
        self.step.release_graph()


def build_bench_step(arch: str = "resnet32", peers: int = 3, peer_exec: str = "loop",
                     device: str | torch.device = "cuda", bf16: bool = True,
                     channels_last: bool = True, cuda_graphs: bool = True, *,
                     batch_size: int = 128, num_classes: int = 100, mix: str = "cutnmix",
                     teacher: str = "ema", fml: bool = True, seed: int = 0,
                     lr: float = 0.1) -> BenchStep:
    """A ready-to-run train step of `cnm train` with its default recipe (see the module
    docstring). A comma list in `arch` builds a mixed ensemble (then `peers` is ignored)."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    archs = arch.split(",") if "," in arch else [arch] * peers
    peerset = build_peers(archs, num_classes, peer_exec=peer_exec).to(dev)
    if channels_last:
        peerset = peerset.to(memory_format=torch.channels_last)
    ema = EMATeacher(peerset, decay=0.999) if teacher == "ema" else None
    aug = build_augment(mix, len(archs), out_dtype=torch.bfloat16 if bf16 else torch.float32)
    step = TrainStep(peerset, ema, aug, losses=LossSetup(teacher=teacher, fml=fml), lr=lr,
                     device=dev, bf16=bf16, channels_last=channels_last, cuda_graphs=cuda_graphs,
                     seed=seed)
    step.set_ramp(1.0)
    g = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, 32, 32, 3), dtype=torch.uint8, generator=g).to(dev)
    labels = torch.randint(0, num_classes, (batch_size,), generator=g).to(dev)
    return BenchStep(step, images, labels)
