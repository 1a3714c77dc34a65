"""CIFAR model definitions used by the online-distillation literature, and their registry.

Every model maps `x [B, 3, H, W]` (H = W = 32 for CIFAR) to `(logits [B, K], feature [B, F])`,
where `feature` is the globally pooled representation the classifier reads, and has a
`feature_dim` attribute (F). Built with `peers=P` the same class is ONE network running P
independent peers side by side (input `[B, P*3, H, W]`, outputs `[B, P*K]`, `[B, P*F]`); see
`trainer.models.layers` and `trainer.peers`.

| name          | definition                                      | module     |
|---------------|-------------------------------------------------|------------|
| resnet20/32/56/110 | He et al. 2016 CIFAR ResNet, option A      | resnet.py  |
| wrn20_8       | Zagoruyko & Komodakis 2016, ResNet-20 layout x8  | wrn.py     |
| vgg16         | Simonyan & Zisserman 2015 config D + BN          | vgg.py     |
| densenet40_12 | Huang et al. 2017, L=40 k=12                     | densenet.py|
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pipeline.errors import CnmError
from trainer.models.densenet import densenet40_12
from trainer.models.resnet import resnet20, resnet32, resnet56, resnet110
from trainer.models.vgg import vgg16
from trainer.models.wrn import wrn20_8

#: name -> constructor `(num_classes, peers=1) -> nn.Module`.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "wrn20_8": wrn20_8,
    "vgg16": vgg16,
    "densenet40_12": densenet40_12,
}


def check_arch(name: str) -> str:
    """Return `name` if it is a registered architecture, else raise CnmError listing the choices."""
    if name not in MODELS:
        raise CnmError(f"unknown architecture {name!r}; choose one of: {', '.join(MODELS)}")
    return name


def build_model(name: str, num_classes: int, peers: int = 1) -> nn.Module:
    """Build architecture `name` with a `num_classes`-way classifier.

    `peers=1` (the default) is the plain network. `peers=P>1` builds the grouped network of P
    peers (prefer `trainer.peers.build_peers(..., peer_exec="grouped")`, which also makes its
    initialisation equal to P single networks built in a row).
    """
    check_arch(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise CnmError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(peers, int) or peers < 1:
        raise CnmError(f"peers must be a positive integer, got {peers!r}")
    model = MODELS[name](num_classes, peers=peers)
    model.arch = name
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["MODELS", "build_model", "check_arch", "count_parameters"]
