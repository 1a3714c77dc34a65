"""The train step: Cut^nMix augment -> peers forward -> online-KD losses -> backward -> SGD -> EMA.

One step on a uint8 batch (DESIGN.md, "Online distillation"):

    views, y_a, y_b, lam = CutNMix(images, labels)           views [P,B,3,32,32], peer k gets views[k]
    logits [P,B,K], features [P x [B,F]] = PeerSet(views)    (loop: one peer after another; grouped: all at once)
    t = mean_j EMA_j(views[j])   (teacher ema)  |  mean_j z_j.detach()  (teacher peers)
    loss = sum_k [ CE_k + w(e) * (kd_weight * KD_k(t) + fml_weight * FML_k) ]
    loss.backward(); SGD(momentum, nesterov, weight decay) with lr from a device tensor; EMA update

Host synchronisation: none. Loss terms, (lam-weighted) correct counts per peer and a non-finite
flag accumulate in device tensors; `read_metrics()` copies them to the host once per epoch.

Randomness: the augmentation parameters are drawn by `CutNMix.draw` from one device
`torch.Generator` that is re-seeded before every step from `(seed, epoch, step)`
(`step_seed`), so a step's augmentation depends only on those three numbers: a resumed run
needs no generator state, and the result does not depend on how the step is executed. The draw
happens OUTSIDE the CUDA graph (a handful of small kernels on the same stream, no sync); the
graph holds `CutNMix.apply` onwards and reads the parameters from static buffers. This avoids
depending on how a torch version registers custom generators with graphs
(`CUDAGraph.register_generator_state`, torch >= 2.5), works the same on CPU and CUDA and with
any torch >= 2.4. The default CUDA generator (used by nothing in the step) would be handled by
torch's graph capture automatically.

CUDA graph (`cuda_graphs=True`, PyTorch "whole-network capture"): static input buffers; three
warm-up steps on a side stream (cuDNN autotuning, allocator warm-up), capture of one step with
`torch.cuda.graph`, then every parameter, buffer, momentum, EMA weight and counter is restored
to its pre-warm-up value, so capturing does not change the training trajectory (the eager step
and the replayed graph give the same parameters; tests/trainer/test_step.py, gpu-marked). The
lr and the ramp-up weight w(e) are 0-d device tensors written with `fill_` outside the graph.
Autocast runs with `cache_enabled=False` (a requirement of graph capture). A batch whose shape
differs from the captured one (a short last batch) runs eagerly on the same tensors.

Optimiser: `CapturableSGD`, SGD with momentum, dampening 0, Nesterov and L2 weight decay exactly
as `torch.optim.SGD` (checked against it in the tests), written with `torch._foreach_*` ops and a
device-tensor lr. `torch.optim.SGD` cannot be used: its foreach path turns a tensor lr into a
host scalar (`alpha=-lr`, a sync and a value frozen at capture), and the fused path is CUDA-only
and version-dependent. Momentum buffers start at zero, which with dampening 0 is identical to
torch's "first step copies the gradient".

Bench factory (for `bench/`): `build_bench_step(arch, peers, peer_exec, device, bf16,
channels_last, cuda_graphs, batch_size=128, num_classes=100, mix="cutnmix", teacher="ema",
fml=True, seed=0) -> BenchStep` builds the peers, EMA teacher, Cut^nMix op and a `TrainStep`
with the default recipe (ramp weight 1, so every loss term is computed). `b(images, labels)` runs
one step on a uint8 [B,32,32,3] device batch without synchronising; `b.images`/`b.labels` hold
one random batch, `b.run(n)` runs n steps on it, `b.sync()` waits for the device, `b.close()`
drops the CUDA graph:

    from trainer.step import build_bench_step
    b = build_bench_step("resnet32", 3, "grouped", "cuda", bf16=True, channels_last=True, cuda_graphs=True)
    b.run(20); b.sync()                      # warm-up (the first step captures the graph)
    t0 = time.perf_counter(); b.run(200); b.sync(); dt = time.perf_counter() - t0
    print(200 * b.images_per_step / dt, "images/s")
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from pipeline.errors import CnmError

LOSS_TERMS = ("loss", "ce", "kd", "fml")  # order of the loss accumulator


def step_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """The 63-bit seed of the augmentation of step `step` of `epoch` on `rank`: the loaders'
    `augment_seed` (BLAKE2b of the tuple), so a loader that augments (`make_loader(...,
    augment=op)`) and this step draw the same parameters for the same batch."""
    from pipeline.loaders.base import augment_seed

    return augment_seed(seed, epoch, rank, step)


class CapturableSGD:
    """SGD with momentum/Nesterov/L2 weight decay whose lr is a 0-d device tensor.

    Per parameter p with gradient g (torch.optim.SGD semantics, dampening 0):
        d = g + wd * p;  buf = momentum * buf + d;  d = d + momentum * buf (nesterov) else buf
        p -= lr * d
    No host sync, no data-dependent Python branches: safe inside a CUDA graph.
    """

    def __init__(self, params: Sequence[nn.Parameter], lr: torch.Tensor, momentum: float = 0.9,
                 weight_decay: float = 5e-4, nesterov: bool = True):
        self.params = [p for p in params if p.requires_grad]
        self.lr = lr
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)
        self.bufs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        params = self.params
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.weight_decay:
            d = torch._foreach_add(grads, params, alpha=self.weight_decay)
        else:
            d = [g.clone() for g in grads]
        if self.momentum:
            torch._foreach_mul_(self.bufs, self.momentum)
            torch._foreach_add_(self.bufs, d)
            if self.nesterov:
                torch._foreach_add_(d, self.bufs, alpha=self.momentum)
            else:
                d = self.bufs
        torch._foreach_sub_(params, torch._foreach_mul(d, self.lr))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_tensors(self) -> list[torch.Tensor]:
        return list(self.bufs)


def build_augment(mix: str, peers: int, *, alpha: float = 1.0, mix_prob: float = 0.5,
                  mean=(125.3, 123.0, 113.9), std=(63.0, 62.1, 66.7),
                  out_dtype: torch.dtype = torch.float32):
    """The Cut^nMix op of the step (pad 4, flip, per-channel normalisation)."""
    from pipeline.ops import CutNMix

    return CutNMix(peers=peers, mode=mix, alpha=alpha, mix_prob=mix_prob, pad=4, flip=True,
                   mean=tuple(mean), std=tuple(std), out_dtype=out_dtype, impl="auto")


@dataclass(frozen=True)
class LossSetup:
    """Which online-distillation terms the step computes (DESIGN.md)."""

    teacher: str = "ema"        # "ema" | "peers" | "none"
    fml: bool = True
    kd_weight: float = 1.0
    fml_weight: float = 1.0
    temperature: float = 3.0


def _state_tensors(module) -> list[torch.Tensor]:
    if module is None:
        return []
    if isinstance(module, nn.Module):
        return [t for t in module.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)]
    if hasattr(module, "state_dict"):
        return [t for t in module.state_dict().values() if isinstance(t, torch.Tensor)]
    return []


class TrainStep:
    """One training step of the peer ensemble; eager, or replayed from a CUDA graph.

    Call `step(images, labels, epoch=e, step=i)` with images uint8 [B,32,32,3] and labels int64
    [B] on `device`, or `step.run_views(views, y_a, y_b, lam)` with pre-augmented views
    [P,B,3,32,32] (the CPU-augment loader). Before steps: `set_lr(x)` and `set_ramp(w)` (host
    floats, written to device tensors). Per epoch: `reset_metrics()`, then `read_metrics()` (the
    one host sync).

    `grad_hook`: an optional callable run between backward and the optimiser step, on the
    gradients in place (a data-parallel gradient all-reduce); with CUDA graphs the step is then
    captured as two graphs with the hook run eagerly between them. A hook that also has
    `pack(grads)`, `reduce()` and `unpack(grads)` (`trainer.distributed.GradAllReduce`) is split:
    `pack` is captured at the end of the first graph, `unpack` at the start of the second, and
    only `reduce()` (the collective) runs between the replays, on the captured gradient tensors.

    Why the all-reduce stays OUTSIDE the graphs (the multi-GPU decision, README "The all-reduce
    and the CUDA graph"): a collective replayed from a graph is invisible to NCCL's watchdog,
    so a dead or stuck peer would hang the replay forever instead of failing after
    --dist-timeout; capturing NCCL also needs NCCL >= 2.9.6 (and, for DDP, a side-stream
    construction, >= 11 eager warm-up steps and TORCH_NCCL_ASYNC_ERROR_HANDLING=0). The price is
    one extra graph launch and one NCCL launch per step on the host (~10-20 us), hidden while the
    host runs ahead of the device (no host sync inside an epoch). Not measured here: no GPU.
    """

    def __init__(self, peerset: nn.Module, teacher, augment, *, losses: LossSetup,
                 lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 5e-4, device: str | torch.device = "cpu",
                 bf16: bool = False, channels_last: bool = False, cuda_graphs: bool = False,
                 seed: int = 0, rank: int = 0, grad_hook=None):
        from trainer import losses as L

        self.L = L
        self.device = torch.device(device)
        if cuda_graphs and self.device.type != "cuda":
            raise CnmError("CUDA graphs need a CUDA device")
        self.peerset = peerset
        self.teacher = teacher if losses.teacher == "ema" else None
        self.augment = augment
        self.losses = losses
        self.bf16 = bool(bf16)
        self.channels_last = bool(channels_last)
        self.cuda_graphs = bool(cuda_graphs)
        self.seed = int(seed)
        self.rank = int(rank)
        self.P = int(peerset.peers)
        dev = self.device
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True   # fixed shapes: autotune once per layer
        self.lr_t = torch.tensor(float(lr), dtype=torch.float32, device=dev)
        self.ramp_t = torch.tensor(0.0, dtype=torch.float32, device=dev)
        self.global_step_t = torch.zeros((), dtype=torch.int64, device=dev)
        self.epoch_step_t = torch.zeros((), dtype=torch.int64, device=dev)
        self.optimizer = CapturableSGD(list(peerset.parameters()), self.lr_t, momentum=momentum,
                                       weight_decay=weight_decay, nesterov=nesterov)
        # metric accumulators (device)
        self.loss_sums = torch.zeros(len(LOSS_TERMS), dtype=torch.float32, device=dev)
        self.correct = torch.zeros(self.P, dtype=torch.float32, device=dev)
        self.seen = torch.zeros((), dtype=torch.float32, device=dev)
        self.steps_done = torch.zeros((), dtype=torch.float32, device=dev)
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=dev)
        self.generator = torch.Generator(device=dev)
        self.grad_hook = grad_hook
        self._graphs: list | None = None
        self._graph_grads: list | None = None    # the gradient tensors the graphs use
        self._eager_since_capture = False
        self._graph_kind = None
        self._static = None
        self._last_lr = float(lr)

    # ------------------------------------------------------------------ host-side controls
    def set_lr(self, lr: float) -> None:
        if lr != self._last_lr:
            self.lr_t.fill_(lr)
            self._last_lr = lr

    def set_ramp(self, w: float) -> None:
        self.ramp_t.fill_(w)

    def set_global_step(self, n: int) -> None:
        self.global_step_t.fill_(int(n))

    def reset_metrics(self) -> None:
        for t in (self.loss_sums, self.correct, self.seen, self.steps_done, self.epoch_step_t):
            t.zero_()
        self.bad_step.fill_(-1)

    def read_metrics(self, comm=None) -> dict:
        """The epoch's accumulated metrics on the host (the one sync of an epoch).

        Returns {"loss","ce","kd","fml": mean per step, per-peer terms averaged over peers;
        "train_acc": [P] lam-weighted accuracy in %; "steps": int (this process's steps);
        "bad_step": int (-1 if every loss was finite); "global_step": int}.

        `comm` (a `trainer.distributed.Comm` of several processes): the sums are added over all
        processes first (losses per step and accuracy over every shard), and `bad_step` is the
        earliest non-finite step of any process, so every process stops together.
        """
        sums_t = torch.cat([self.loss_sums.double(), self.correct.double(), self.seen.double().view(1),
                            self.steps_done.double().view(1)])
        bad_t = self.bad_step.clone().view(1)
        world = 1
        if comm is not None and comm.world > 1:
            world = comm.world
            comm.all_reduce_sum(sums_t)
            never = torch.iinfo(torch.int64).max
            bad_t = torch.where(bad_t >= 0, bad_t, torch.full_like(bad_t, never))
            comm.all_reduce_min(bad_t)
            bad_t = torch.where(bad_t == never, torch.full_like(bad_t, -1), bad_t)
        packed = torch.cat([sums_t, bad_t.double(), self.global_step_t.double().view(1)]).cpu().tolist()
        n = len(LOSS_TERMS)
        sums, correct = packed[:n], packed[n:n + self.P]
        seen, steps, bad, gstep = packed[n + self.P:]
        out = {name: (s / max(steps, 1.0)) / (1 if name == "loss" else self.P)
               for name, s in zip(LOSS_TERMS, sums)}
        out["train_acc"] = [100.0 * c / max(seen, 1.0) for c in correct]
        out["steps"] = round(steps / world)
        out["bad_step"] = int(bad)
        out["global_step"] = int(gstep)
        return out

    # ------------------------------------------------------------------ the step body
    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              cache_enabled=not self.cuda_graphs)

    def _forward_backward(self, views: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor,
                          lam: torch.Tensor) -> None:
        """Forward, losses, backward and metric accumulation (part A of a step)."""
        L, cfg, P = self.L, self.losses, self.P
        if not self.channels_last:
            views = views.contiguous()
        self.optimizer.zero_grad()
        with self._autocast():
            logits, feats = self.peerset(views)
        logits = logits.float()
        ce = L.mixed_ce(logits, y_a, y_b, lam)                           # [P]
        zero = torch.zeros(P, dtype=torch.float32, device=logits.device)
        if cfg.teacher == "ema":
            with torch.no_grad(), self._autocast():
                t_logits = self.teacher(views)                            # [P,B,K]
            teacher = t_logits.float().mean(0)
        elif cfg.teacher == "peers":
            teacher = logits.detach().mean(0)
        else:
            teacher = None
        kd = L.kd_loss(logits, teacher, cfg.temperature) if teacher is not None else zero
        fml = L.fml_loss([f.float() for f in feats]) if cfg.fml else zero
        per_peer = ce + self.ramp_t * (cfg.kd_weight * kd + cfg.fml_weight * fml)
        total = per_peer.sum()
        total.backward()
        with torch.no_grad():
            self.loss_sums += torch.stack([total.detach(), ce.detach().sum(), kd.detach().sum(),
                                           fml.detach().sum()])
            pred = logits.detach().argmax(-1)                             # [P,B]
            lam_f = lam.float()
            hit = lam_f * (pred == y_a).float() + (1 - lam_f) * (pred == y_b).float()
            self.correct += hit.sum(1)
            self.seen += y_a.shape[0]
            self.steps_done += 1
            bad = ~torch.isfinite(total.detach())
            self.bad_step.copy_(torch.where(bad & (self.bad_step < 0), self.epoch_step_t, self.bad_step))

    def _update(self) -> None:
        """SGD, EMA and the step counters (part B of a step)."""
        self.optimizer.step()
        if self.teacher is not None:
            self.teacher.update(self.global_step_t)
        with torch.no_grad():
            self.epoch_step_t += 1
            self.global_step_t += 1

    def _body(self, views, y_a, y_b, lam) -> None:
        """One whole step, eager: part A, the gradient hook (if any), part B."""
        self._forward_backward(views, y_a, y_b, lam)
        if self.grad_hook is not None:
            self.grad_hook()
        self._update()

    def _raw_forward_backward(self, images, labels, params) -> None:
        views, y_a, y_b, lam = self.augment.apply(images, labels, params)
        self._forward_backward(views, y_a, y_b, lam)

    def _raw_body(self, images, labels, params) -> None:
        self._raw_forward_backward(images, labels, params)
        if self.grad_hook is not None:
            self.grad_hook()
        self._update()

    # ------------------------------------------------------------------ public entry points
    def draw(self, batch: int, epoch: int, step: int):
        """Augmentation parameters of step `step` of epoch `epoch` (no host sync)."""
        self.generator.manual_seed(step_seed(self.seed, epoch, step, self.rank))
        return self.augment.draw(batch, self.device, self.generator)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, epoch: int, step: int) -> None:
        params = self.draw(images.shape[0], epoch, step)
        if not self.cuda_graphs:
            return self._raw_body(images, labels, params)
        if self._graphs is None:
            self._capture("raw", (images, labels, params))
        st = self._static
        if self._graph_kind != "raw" or images.shape != st[0].shape:
            self._eager_since_capture = True
            return self._raw_body(images, labels, params)
        st[0].copy_(images)
        st[1].copy_(labels)
        for f in _param_fields(params):
            getattr(st[2], f).copy_(getattr(params, f))
        self._replay()

    def run_views(self, views: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor) -> None:
        """A step on views augmented elsewhere (the CPU-augment loader)."""
        views = views.to(self.device, non_blocking=True)
        y_a, y_b, lam = (t.to(self.device, non_blocking=True) for t in (y_a, y_b, lam))
        if not self.cuda_graphs:
            return self._body(views, y_a, y_b, lam)
        if self._graphs is None:
            self._capture("views", (views, y_a, y_b, lam))
        st = self._static
        if self._graph_kind != "views" or views.shape != st[0].shape or views.dtype != st[0].dtype:
            self._eager_since_capture = True
            return self._body(views, y_a, y_b, lam)
        for dst, src in zip(st, (views, y_a, y_b, lam)):
            dst.copy_(src)
        self._replay()

    def _replay(self) -> None:
        if len(self._graphs) == 1:
            self._graphs[0].replay()
            return
        self._graphs[0].replay()
        if _split_hook(self.grad_hook):
            self.grad_hook.reduce()            # the collective on the captured flat buffers
        else:
            if self._eager_since_capture:      # an eager step re-bound .grad: point it back at
                for p, g in zip(self.optimizer.params, self._graph_grads):   # the graphs' tensors
                    p.grad = g
                self._eager_since_capture = False
            self.grad_hook()
        self._graphs[1].replay()

    # ------------------------------------------------------------------ CUDA graph capture
    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a step mutates (restored after the capture warm-up)."""
        return (_state_tensors(self.peerset) + _state_tensors(self.teacher)
                + self.optimizer.state_tensors()
                + [self.global_step_t, self.epoch_step_t, self.loss_sums, self.correct, self.seen,
                   self.steps_done, self.bad_step])

    def release_graph(self) -> None:
        """Drop the captured graph(s) and static buffers (the next step captures again)."""
        self._graphs = self._graph_kind = self._static = None

    @property
    def _graph(self):
        """The (first) captured graph, or None."""
        return self._graphs[0] if self._graphs else None

    def _capture(self, kind: str, example) -> None:
        """Warm up on a side stream, capture, restore the pre-warm-up state.

        Without a gradient hook the whole step is one graph. With one (a collective such as a
        gradient all-reduce, which runs eagerly), part A (augment .. backward) and part B
        (optimiser, EMA, counters) are two graphs sharing one memory pool, and the hook runs
        between their replays."""
        if kind == "raw":
            images, labels, params = example
            static = (images.clone(), labels.clone(), _clone_params(params))
            part_a = lambda: self._raw_forward_backward(*static)
            whole = lambda: self._raw_body(*static)
        else:
            static = tuple(t.clone() for t in example)
            part_a = lambda: self._forward_backward(*static)
            whole = lambda: self._body(*static)
        saved = [t.detach().clone() for t in self.state_tensors()]
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                whole()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.optimizer.zero_grad()
        graphs = [torch.cuda.CUDAGraph()]
        if self.grad_hook is None:
            with torch.cuda.graph(graphs[0], capture_error_mode="thread_local"):
                whole()
        else:
            split = _split_hook(self.grad_hook)
            with torch.cuda.graph(graphs[0], capture_error_mode="thread_local"):
                part_a()
                if split:
                    self.grad_hook.pack([p.grad for p in self.optimizer.params])
            grads = [p.grad for p in self.optimizer.params]
            if split:
                self.grad_hook.reduce()
            else:
                self.grad_hook()
            graphs.append(torch.cuda.CUDAGraph())
            with torch.cuda.graph(graphs[1], pool=graphs[0].pool(), capture_error_mode="thread_local"):
                if split:
                    self.grad_hook.unpack(grads)
                self._update()
            self._graph_grads, self._eager_since_capture = grads, False
        torch.cuda.synchronize(self.device)
        with torch.no_grad():
            for t, s in zip(self.state_tensors(), saved):
                t.copy_(s)
        self._graphs, self._graph_kind, self._static = graphs, kind, static


def _split_hook(hook) -> bool:
    """Whether a gradient hook comes in pack/reduce/unpack parts (GradAllReduce)."""
    return all(callable(getattr(hook, name, None)) for name in ("pack", "reduce", "unpack"))


def _param_fields(params) -> list[str]:
    return [f.name for f in fields(params) if isinstance(getattr(params, f.name), torch.Tensor)]


def _clone_params(params):
    from dataclasses import replace

    return replace(params, **{f: getattr(params, f).clone() for f in _param_fields(params)})


# ----------------------------------------------------------------------------- bench factory


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
    from trainer.peers import build_peers
    from trainer.teacher import EMATeacher

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
