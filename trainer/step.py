"""The train step: Cut^nMix augment -> peers forward -> online-KD losses -> backward -> SGD -> EMA.

One step on a batch (docs/design.md#the-train-step):

    views, y_a, y_b, lam = input form (below)             views [P,B,3,32,32], peer k gets views[k]
    logits [P,B,K], features [P x [B,F]] = PeerSet(views)    (loop: one peer after another; grouped: all at once)
    t = mean_j EMA_j(views[j])   (teacher ema)  |  mean_j z_j.detach()  (teacher peers)
    with align_views, on the Cut^nMix samples whose peers see different content: t_k = EMA_k(views[k])
    (ema; peers: no KD there) and no FML there (trainer/losses.py shared_content)
    loss = sum_k [ CE_k + w(e) * (kd_weight * KD_k(t) + fml_weight * FML_k) ]
    (--mix-target teacher: a mixed sample's CE_k weighted by 1 - w(e))
    loss.backward(); [gradient hook]; SGD (trainer/optim.py) with lr from a device tensor; EMA update

The input form is chosen once: `DeviceAugment` (uint8 images and labels; the Cut^nMix parameters
are drawn outside the graph from a generator re-seeded per step from `(seed, epoch, rank, step)`,
and `CutNMix.apply` is the graph's first stage) or `LoaderViews` (views made by the CPU-augment
loader with the same seeds). No host sync: losses, (lam-weighted) correct counts and a non-finite
flag accumulate in device tensors, read once per epoch by `read_metrics()`; lr and ramp are 0-d
device tensors written with `fill_`. With `cuda_graphs`, three warm-up steps on a side stream,
capture, and every mutated tensor restored, so capturing does not change the trajectory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from pipeline.errors import CnmError
from pipeline.loaders.base import augment_seed, mixes
from pipeline.ops import CutNMix
from pipeline.ops.params import CutNMixParams
from trainer import losses as L
from trainer.optim import CapturableSGD

LOSS_TERMS = ("loss", "ce", "kd", "fml")  # order of the loss accumulator


def step_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """The 63-bit seed of the augmentation of step `step` of `epoch` on `rank`: the loaders'
    `augment_seed` (BLAKE2b of the tuple), so a loader that augments (`make_loader(...,
    augment=op)`) and this step draw the same parameters for the same batch."""
    return augment_seed(seed, epoch, rank, step)


def build_augment(mix: str, peers: int, *, alpha: float = 1.0, mix_prob: float = 0.5,
                  mean=(125.3, 123.0, 113.9), std=(63.0, 62.1, 66.7),
                  out_dtype: torch.dtype = torch.float32, impl: str = "auto") -> CutNMix:
    """The Cut^nMix op of the step (pad 4, flip, per-channel normalisation); `impl` as
    `pipeline.ops.cutnmix` ("auto": Triton on CUDA, the numba kernel on the CPU)."""
    return CutNMix(peers=peers, mode=mix, alpha=alpha, mix_prob=mix_prob, pad=4, flip=True,
                   mean=tuple(mean), std=tuple(std), out_dtype=out_dtype, impl=impl)


@dataclass(frozen=True)
class LossSetup:
    """Which online-distillation terms the step computes (docs/design.md#losses)."""

    teacher: str = "ema"        # "ema" | "peers" | "none"
    fml: bool = True
    kd_weight: float = 1.0
    fml_weight: float = 1.0
    temperature: float = 3.0
    align_views: bool = True    # KD/FML only between views that show the same content
    mix_target: str = "area"    # "area" | "teacher": a mixed sample's CE weighted by 1 - w(e)


# ----------------------------------------------------------------------------- input forms


class DeviceAugment:
    """Input form of raw batches: `(images uint8 [B,32,32,3], labels int64 [B])` on the device.

    `inputs` (outside any graph) re-seeds the step's generator from `step_seed(seed, epoch, step,
    rank)` and draws the Cut^nMix parameters (a few small kernels, no sync); `views` (the
    graph's first stage) applies the op. The draw stays outside the graph so that it does not
    depend on how a torch version registers generators with graphs.
    """

    def __init__(self, augment: CutNMix, device: torch.device, seed: int, rank: int,
                 layout: str = "peers", mix_off_epoch: int | None = None, mix_on_epoch: int = 0):
        # layout="grouped" (grouped peers): the op writes the grouped network's input
        # [B,P*3,H,W] itself, which saves the copy `views_to_grouped_input` would make.
        self.augment = augment if augment.layout == layout else augment.with_layout(layout)
        # outside [mix_on_epoch, mix_off_epoch), the same draws with mix_prob 0: the base views
        # only. Only the parameters change, not the graph that applies them.
        self.unmixed = self.augment.with_mix_prob(0.0)
        self.mix_on_epoch, self.mix_off_epoch = mix_on_epoch, mix_off_epoch
        self.device, self.seed, self.rank = device, int(seed), int(rank)
        self.generator = torch.Generator(device=device)

    def draw(self, batch: int, epoch: int, step: int) -> CutNMixParams:
        """Augmentation parameters of step `step` of epoch `epoch` (no host sync)."""
        self.generator.manual_seed(step_seed(self.seed, epoch, step, self.rank))
        mixing = mixes(epoch, self.mix_on_epoch, self.mix_off_epoch)
        return (self.augment if mixing else self.unmixed).draw(batch, self.device, self.generator)

    def inputs(self, batch: tuple, epoch: int, step: int) -> tuple:
        images, labels = batch
        return images, labels, self.draw(images.shape[0], epoch, step)

    def views(self, images: torch.Tensor, labels: torch.Tensor, params: CutNMixParams):
        return self.augment.apply(images, labels, params)


class LoaderViews:
    """Input form of batches augmented by the CPU-augment loader: `(views [P,B,3,32,32], y_a
    int64 [B], y_b int64 [B], lam float32 [B])`, copied to the device without blocking."""

    def __init__(self, device: torch.device):
        self.device = device

    def inputs(self, batch: tuple, epoch: int, step: int) -> tuple:
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    def views(self, views, y_a, y_b, lam):
        return views, y_a, y_b, lam


def _tensors(inputs: tuple) -> list[torch.Tensor]:
    """The tensors of a step's inputs, in order (the fields of a `CutNMixParams` flattened)."""
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            out.append(x)
        else:
            out.extend(getattr(x, f.name) for f in fields(x) if isinstance(getattr(x, f.name), torch.Tensor))
    return out


def _clone(inputs: tuple) -> tuple:
    """A copy of a step's inputs with fresh tensors (the static buffers of a CUDA graph)."""
    return tuple(x.clone() if isinstance(x, torch.Tensor) else
                 replace(x, **{f.name: getattr(x, f.name).clone() for f in fields(x)
                               if isinstance(getattr(x, f.name), torch.Tensor)})
                 for x in inputs)


def _signature(inputs: tuple) -> tuple:
    return tuple((t.shape, t.dtype) for t in _tensors(inputs))


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

    `step(*batch, epoch=e, step=i)` with the loader's batch: `(images uint8 [B,32,32,3], labels
    int64 [B])` on `device`, or with `host_augment=True` the CPU-augment loader's `(views
    [P,B,3,32,32], y_a, y_b, lam)`. Before steps: `set_lr(x)` and `set_ramp(w)` (host floats,
    written to device tensors). Per epoch: `reset_metrics()`, then `read_metrics()` (the one host
    sync). With `loss_buffer` set (a `trainer.tblog.StepLossBuffer`), every step also records its
    total loss there (device ops only).

    `grad_hook`: an optional callable run between backward and the optimiser step, on the
    gradients in place (a data-parallel gradient all-reduce); with CUDA graphs the step is then
    captured as two graphs sharing one pool with the hook run eagerly between them. A hook that
    also has `pack(grads)`, `reduce()` and `unpack(grads)` (`trainer.distributed.GradAllReduce`)
    is split: `pack` is captured at the end of the first graph, `unpack` at the start of the
    second, and only `reduce()` (the collective) runs between the replays. The collective stays
    outside the graphs so that NCCL's watchdog sees it (docs/distributed.md).
    """

    def __init__(self, peerset: nn.Module, teacher, augment: CutNMix, *, losses: LossSetup,
                 lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 5e-4, device: str | torch.device = "cpu",
                 bf16: bool = False, channels_last: bool = False, cuda_graphs: bool = False,
                 seed: int = 0, rank: int = 0, grad_hook=None, host_augment: bool = False,
                 mix_off_epoch: int | None = None, mix_on_epoch: int = 0):
        dev = self.device = torch.device(device)
        if cuda_graphs and dev.type != "cuda":
            raise CnmError("CUDA graphs need a CUDA device")
        self.peerset = peerset
        self.teacher = teacher if losses.teacher == "ema" else None
        self.augment = augment
        layout = "grouped" if getattr(peerset, "peer_exec", "loop") == "grouped" else "peers"
        self.input_form = (LoaderViews(dev) if host_augment
                           else DeviceAugment(augment, dev, seed, rank, layout=layout,
                                              mix_off_epoch=mix_off_epoch, mix_on_epoch=mix_on_epoch))
        self.losses = losses
        self.bf16 = bool(bf16)
        self.channels_last = bool(channels_last)
        self.cuda_graphs = bool(cuda_graphs)
        self.P = int(peerset.peers)
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
        self.grad_hook = grad_hook
        self.loss_buffer = None                  # a trainer.tblog.StepLossBuffer (--log tensorboard)
        self._graphs: list | None = None
        self._graph_grads: list | None = None    # the gradient tensors the graphs use
        self._eager_since_capture = False
        self._static: tuple | None = None        # the graphs' input tensors
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

    def _forward_backward(self, inputs: tuple) -> None:
        """Views, forward, losses, backward and metric accumulation (part A of a step)."""
        cfg, P = self.losses, self.P
        views, y_a, y_b, lam = self.input_form.views(*inputs)
        if not self.channels_last:
            views = views.contiguous()
        self.optimizer.zero_grad()
        with self._autocast():
            logits, feats = self.peerset(views)
        logits = logits.float()
        # --mix-target teacher: a mixed sample's area label fades out as the ramp w(e) rises, and
        # what teaches it is the KD term, the EMA teacher's prediction of the view it shows
        ce_weight = (torch.where(lam < 1, 1 - self.ramp_t, torch.ones_like(self.ramp_t))
                     if cfg.mix_target == "teacher" else None)
        ce = L.mixed_ce(logits, y_a, y_b, lam, ce_weight)                # [P]
        zero = torch.zeros(P, dtype=torch.float32, device=logits.device)
        # shared [B] bool: the samples whose P views show the same content (all, unless aligning
        # Cut^nMix views); the cross-peer terms (ensemble target, FML) use only those.
        shared = L.shared_content(lam, self.augment.mode) if cfg.align_views else None
        kd_weight = None
        if cfg.teacher == "ema":
            with torch.no_grad(), self._autocast():
                t_logits = self.teacher(views).float()                    # [P,B,K]
            teacher = t_logits.mean(0)
            if shared is not None:                # elsewhere each peer's own EMA on its own view
                teacher = torch.where(shared.view(1, -1, 1), teacher.unsqueeze(0), t_logits)
        elif cfg.teacher == "peers":
            teacher, kd_weight = logits.detach().mean(0), shared
        else:
            teacher = None
        kd = L.kd_loss(logits, teacher, cfg.temperature, kd_weight) if teacher is not None else zero
        fml = L.fml_loss([f.float() for f in feats], shared) if cfg.fml else zero
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
            if self.loss_buffer is not None:     # at the global step this step completes
                self.loss_buffer.record(total.detach(), self.global_step_t + 1)

    def _update(self) -> None:
        """SGD, EMA and the step counters (part B of a step)."""
        self.optimizer.step()
        if self.teacher is not None:
            self.teacher.update(self.global_step_t)
        with torch.no_grad():
            self.epoch_step_t += 1
            self.global_step_t += 1

    def _run(self, inputs: tuple) -> None:
        """One whole step, eager: part A, the gradient hook (if any), part B."""
        self._forward_backward(inputs)
        if self.grad_hook is not None:
            self.grad_hook()
        self._update()

    # ------------------------------------------------------------------ the entry point
    def __call__(self, *batch: torch.Tensor, epoch: int, step: int) -> None:
        """One step on a loader batch (see the class docstring); no host sync."""
        inputs = self.input_form.inputs(batch, epoch, step)
        if not self.cuda_graphs:
            return self._run(inputs)
        if self._graphs is None:
            self._capture(inputs)
        if _signature(inputs) != _signature(self._static):   # a short last batch: eager
            self._eager_since_capture = True
            return self._run(inputs)
        for dst, src in zip(_tensors(self._static), _tensors(inputs)):
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
                   self.steps_done, self.bad_step]
                + ([] if self.loss_buffer is None else
                   [self.loss_buffer.loss, self.loss_buffer.step, self.loss_buffer.count]))

    def release_graph(self) -> None:
        """Drop the captured graph(s) and static buffers (the next step captures again)."""
        self._graphs = self._static = None

    @property
    def _graph(self):
        """The (first) captured graph, or None."""
        return self._graphs[0] if self._graphs else None

    def _capture(self, example: tuple) -> None:
        """Warm up on a side stream, capture, restore the pre-warm-up state.

        Without a gradient hook the whole step is one graph. With one (a collective such as a
        gradient all-reduce, which runs eagerly), part A (augment .. backward) and part B
        (optimiser, EMA, counters) are two graphs sharing one memory pool, and the hook runs
        between their replays."""
        static = _clone(example)
        saved = [t.detach().clone() for t in self.state_tensors()]
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._run(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.optimizer.zero_grad()
        graphs = [torch.cuda.CUDAGraph()]
        if self.grad_hook is None:
            with torch.cuda.graph(graphs[0], capture_error_mode="thread_local"):
                self._run(static)
        else:
            split = _split_hook(self.grad_hook)
            with torch.cuda.graph(graphs[0], capture_error_mode="thread_local"):
                self._forward_backward(static)
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
        self._graphs, self._static = graphs, static


def _split_hook(hook) -> bool:
    """Whether a gradient hook comes in pack/reduce/unpack parts (GradAllReduce)."""
    return all(callable(getattr(hook, name, None)) for name in ("pack", "reduce", "unpack"))
