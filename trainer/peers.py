"""Peer execution: P peer networks as a loop of separate models or as one grouped network.

`build_peers(archs, num_classes, peer_exec)` returns a `PeerSet`:

- `loop`: P separate models, run one after another, peer k on its own view `views[k]`. Works
  for any mix of architectures (`["resnet32", "wrn20_8"]`).
- `grouped`: ONE network whose convolutions have `groups=P`, whose BatchNorm runs over P*C
  channels and whose classifier is a batched matmul (`trainer.models.layers`); the P views
  are concatenated along channels (`[B, P*3, H, W]`) and the P peers run as one kernel per
  layer. Exactly equivalent to `loop` (same outputs, gradients and BN statistics, up to
  floating-point summation order) and built from the same random draws, so a seed gives the
  same initial peers in both modes. Needs one architecture for all peers.

Checkpoints are interchangeable: `peer_state_dicts()` returns P state dicts of single networks
(`build_model(arch, K)`), in both modes, and `load_peer_state_dicts()` takes them back; for
`grouped` this is an exact split (`chunk` along dim 0) and merge (`cat`), see
`split_state_dict`/`merge_state_dicts`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from pipeline.choices import PEER_EXECS
from pipeline.errors import CnmError
from trainer.models import build_model, check_arch
from trainer.models.layers import is_channels_last

PEER_EXEC = tuple(e for e in PEER_EXECS if e != "auto")


def split_state_dict(state: Mapping[str, torch.Tensor], peers: int) -> list[OrderedDict]:
    """Split a grouped network's state dict into `peers` single-network state dicts.

    Every tensor with a leading axis is the concatenation of the peers' tensors along dim 0, so
    peer p gets `chunk(peers, dim=0)[p]` (cloned); 0-d tensors (`num_batches_tracked`) are
    shared and copied to every peer.
    """
    out = [OrderedDict() for _ in range(peers)]
    for key, value in state.items():
        if value.dim() == 0:
            for p in range(peers):
                out[p][key] = value.clone()
            continue
        if value.shape[0] % peers:
            raise CnmError(f"cannot split {key!r} of shape {tuple(value.shape)} into {peers} peers")
        for p, part in enumerate(value.chunk(peers, dim=0)):
            out[p][key] = part.clone()
    return out


def merge_state_dicts(states: Sequence[Mapping[str, torch.Tensor]]) -> OrderedDict:
    """Merge single-network state dicts into one grouped state dict (inverse of the split).

    Tensors are concatenated along dim 0; 0-d tensors (`num_batches_tracked`, equal for peers
    trained together) are taken from peer 0. All states must have the same keys and shapes.
    """
    if not states:
        raise CnmError("no peer state dicts to merge")
    keys = list(states[0].keys())
    for k, s in enumerate(states[1:], start=1):
        if list(s.keys()) != keys:
            raise CnmError(f"peer {k}'s state dict has different keys from peer 0's "
                           "(different architectures?)")
    merged = OrderedDict()
    for key in keys:
        parts = [s[key] for s in states]
        shapes = {tuple(t.shape) for t in parts}
        if len(shapes) != 1:
            raise CnmError(f"peer state dicts disagree on the shape of {key!r}: {sorted(shapes)}")
        merged[key] = parts[0].clone() if parts[0].dim() == 0 else torch.cat(parts, dim=0)
    return merged


class PeerSet(nn.Module):
    """P peer networks. Subclasses: `LoopPeers`, `GroupedPeers` (use `build_peers`).

    Attributes: `archs` (list of P names), `peers` (P), `num_classes` (K), `peer_exec`,
    `feature_dims` (list of P feature sizes).
    """

    peer_exec: str

    def __init__(self, archs: Sequence[str], num_classes: int):
        super().__init__()
        self.archs = list(archs)
        self.peers = len(self.archs)
        self.num_classes = num_classes
        self.feature_dims: list[int] = []

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`views [P, B, 3, H, W]` (peer k's view at index k; any float dtype, each `views[k]`
        contiguous or channels-last) -> `(logits [P, B, K], features: list of P [B, F_k])`.
        dtype follows the input / autocast."""
        raise NotImplementedError

    def forward_shared(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Every peer on the same images (evaluation): `images [B, 3, H, W]` -> as `forward`."""
        return self.forward(images.unsqueeze(0).expand(self.peers, *images.shape))

    def peer_state_dicts(self) -> list[OrderedDict]:
        """P state dicts, each loadable into `build_model(archs[k], num_classes)`."""
        raise NotImplementedError

    def load_peer_state_dicts(self, states: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Load P single-network state dicts (from either mode's `peer_state_dicts`)."""
        raise NotImplementedError

    def split_by_peer(self, named: Mapping[str, torch.Tensor]) -> list[OrderedDict]:
        """Tensors keyed by this set's parameter names (`named_parameters()`; e.g. momentum
        buffers) -> P dicts keyed like `peer_state_dicts()`, so what is saved does not depend
        on --peer-exec."""
        raise NotImplementedError

    def merge_by_peer(self, states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Inverse of `split_by_peer`: P per-peer dicts -> tensors keyed by parameter name."""
        raise NotImplementedError

    def _check_views(self, views: torch.Tensor) -> None:
        if views.dim() != 5 or views.shape[0] != self.peers or views.shape[2] != 3:
            raise CnmError(f"peer views must be [P={self.peers}, B, 3, H, W], "
                           f"got {tuple(views.shape)}")

    def _check_states(self, states: Sequence[Mapping[str, torch.Tensor]]) -> None:
        if len(states) != self.peers:
            raise CnmError(f"expected {self.peers} peer state dicts, got {len(states)}")

    def extra_repr(self) -> str:
        return f"archs={self.archs}, num_classes={self.num_classes}, peer_exec={self.peer_exec!r}"


class LoopPeers(PeerSet):
    """P separate models (`self.models[k]`), peer k run on `views[k]`, one after another."""

    peer_exec = "loop"

    def __init__(self, archs: Sequence[str], num_classes: int):
        super().__init__(archs, num_classes)
        self.models = nn.ModuleList(build_model(a, num_classes) for a in self.archs)
        self.feature_dims = [m.feature_dim for m in self.models]

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._check_views(views)
        logits, features = [], []
        for model, view in zip(self.models, views.unbind(0)):
            z, f = model(view)
            logits.append(z)
            features.append(f)
        return torch.stack(logits), features

    def forward_shared(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outs = [model(images) for model in self.models]
        return torch.stack([z for z, _ in outs]), [f for _, f in outs]

    def peer_state_dicts(self) -> list[OrderedDict]:
        return [OrderedDict((k, v.detach().clone()) for k, v in m.state_dict().items())
                for m in self.models]

    def load_peer_state_dicts(self, states: Sequence[Mapping[str, torch.Tensor]]) -> None:
        self._check_states(states)
        for k, (model, state) in enumerate(zip(self.models, states)):
            try:
                model.load_state_dict(state)
            except RuntimeError as e:
                raise CnmError(f"peer {k} ({self.archs[k]}): state dict does not fit: "
                               f"{str(e).splitlines()[0]}") from None

    def split_by_peer(self, named: Mapping[str, torch.Tensor]) -> list[OrderedDict]:
        out = [OrderedDict() for _ in range(self.peers)]
        for n, t in named.items():
            _, k, rest = n.split(".", 2)          # "models.<k>.<name>"
            out[int(k)][rest] = t
        return out

    def merge_by_peer(self, states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {f"models.{k}.{n}": t for k, s in enumerate(states) for n, t in s.items()}


def views_to_grouped_input(views: torch.Tensor) -> torch.Tensor:
    """`views [P, B, 3, H, W]` -> `[B, P*3, H, W]` (peer k's channels at `3k:3k+3`).

    Channels-last views give a channels-last result, contiguous views a contiguous one (one copy
    either way).
    """
    P, B, C, H, W = views.shape
    if is_channels_last(views[0]):
        return views.permute(1, 3, 4, 0, 2).reshape(B, H, W, P * C).permute(0, 3, 1, 2)
    return views.transpose(0, 1).reshape(B, P * C, H, W)


class GroupedPeers(PeerSet):
    """P peers of one architecture as one grouped network (`self.net`, built with `peers=P`)."""

    peer_exec = "grouped"

    def __init__(self, archs: Sequence[str], num_classes: int):
        super().__init__(archs, num_classes)
        arch = self.archs[0]
        # Draw the P peers exactly as `LoopPeers` does (same seed -> same peers), then build the
        # grouped network without touching the RNG (meta device) and load the merged weights.
        singles = [build_model(arch, num_classes) for _ in range(self.peers)]
        with torch.device("meta"):
            net = build_model(arch, num_classes, peers=self.peers)
        net = net.to_empty(device="cpu")
        net.load_state_dict(merge_state_dicts([m.state_dict() for m in singles]))
        self.net = net
        self.feature_dims = [singles[0].feature_dim] * self.peers

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """As `PeerSet.forward`; also takes the grouped input itself, `[B, P*3, H, W]` (peer k's
        channels at 3k:3k+3: the Cut^nMix op's layout="grouped"), without the copy."""
        P = self.peers
        if views.dim() == 4 and views.shape[1] == 3 * P:
            x = views
        else:
            self._check_views(views)
            x = views_to_grouped_input(views)
        B = x.shape[0]
        logits, features = self.net(x)                                # [B, P*K], [B, P*F]
        logits = logits.view(B, P, self.num_classes).transpose(0, 1)  # [P, B, K]
        return logits, list(features.chunk(P, dim=1))

    def peer_state_dicts(self) -> list[OrderedDict]:
        return split_state_dict({k: v.detach() for k, v in self.net.state_dict().items()},
                                self.peers)

    def load_peer_state_dicts(self, states: Sequence[Mapping[str, torch.Tensor]]) -> None:
        self._check_states(states)
        merged = merge_state_dicts(states)
        try:
            self.net.load_state_dict(merged)
        except RuntimeError as e:
            raise CnmError(f"peer state dicts do not fit a grouped {self.archs[0]}: "
                           f"{str(e).splitlines()[0]}") from None

    def split_by_peer(self, named: Mapping[str, torch.Tensor]) -> list[OrderedDict]:
        return split_state_dict({n[len("net."):]: t for n, t in named.items()}, self.peers)

    def merge_by_peer(self, states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"net." + n: t for n, t in merge_state_dicts(states).items()}


def build_peers(archs: Sequence[str], num_classes: int, peer_exec: str = "loop") -> PeerSet:
    """Build a `PeerSet` of `len(archs)` peers; `archs[k]` is peer k's architecture name.

    `peer_exec`: "loop" (any architectures) or "grouped" (one architecture for every peer).
    Bad input (unknown arch, no peers, unknown mode, grouped with mixed archs) -> CnmError.
    For a given torch seed both modes start from the same peer weights.
    """
    archs = list(archs)
    if not archs:
        raise CnmError("need at least one peer (peers >= 1)")
    for a in archs:
        check_arch(a)
    if peer_exec not in PEER_EXEC:
        raise CnmError(f"unknown peer execution {peer_exec!r}; choose one of: {', '.join(PEER_EXEC)}")
    if peer_exec == "grouped":
        if len(set(archs)) > 1:
            raise CnmError(f"--peer-exec grouped needs one architecture for all peers, got "
                           f"{','.join(archs)}; use --peer-exec loop for a mixed ensemble")
        return GroupedPeers(archs, num_classes)
    return LoopPeers(archs, num_classes)


__all__ = [
    "PEER_EXEC",
    "GroupedPeers",
    "LoopPeers",
    "PeerSet",
    "build_peers",
    "merge_state_dicts",
    "split_state_dict",
    "views_to_grouped_input",
]
