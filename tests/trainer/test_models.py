"""Models: registry, shapes, parameter counts against the published ones, channel-block layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import CnmError
from trainer.models import MODELS, build_model, count_parameters
from trainer.models.layers import PeerConv2d, PeerLinear, is_channels_last, peer_cat, peer_pad_channels

# (arch, classes, published count, source). Tolerance 2% (the papers round to 2 digits).
PUBLISHED = [
    ("resnet20", 10, 0.27e6, "He et al. 2016, Table 6 (CIFAR-10)"),
    ("resnet32", 10, 0.46e6, "He et al. 2016, Table 6; ONE/OKDDip tables (CIFAR-10)"),
    ("resnet32", 100, 0.47e6, "0.46M + the 64x90 wider classifier (CIFAR-100)"),
    ("resnet56", 10, 0.85e6, "He et al. 2016, Table 6 (CIFAR-10)"),
    ("resnet110", 10, 1.7e6, "He et al. 2016, Table 6; ONE/OKDDip tables (CIFAR-10)"),
    ("densenet40_12", 10, 1.0e6, "Huang et al. 2017, Table 2, DenseNet L=40 k=12 (CIFAR-10)"),
    ("densenet40_12", 100, 1.06e6, "1.0M + the 448x90 wider classifier (CIFAR-100)"),
    ("vgg16", 10, 14.7e6, "CIFAR VGG-16 (BN, one linear classifier) as listed in online-KD tables"),
    ("wrn20_8", 100, 17.2e6, "WRN-20-8 as listed in online-KD tables = ResNet-20 widened 8x (0.27M*64)"),
]


@pytest.mark.parametrize("arch,classes,published,source", PUBLISHED,
                         ids=[f"{a}-c{k}" for a, k, _, _ in PUBLISHED])
def test_parameter_count_matches_published(arch, classes, published, source):
    with torch.device("meta"):                      # counting needs no memory or RNG
        model = build_model(arch, classes)
    n = count_parameters(model)
    assert abs(n - published) / published < 0.02, f"{arch}: {n} vs {published} ({source})"


@pytest.mark.parametrize("arch", list(MODELS))
def test_forward_shapes_and_feature_dim(arch):
    model = build_model(arch, 7)
    side = 32 if arch == "vgg16" else 8             # all but VGG (5 max-pools) take any size
    x = torch.randn(2, 3, side, side)
    logits, feature = model(x)
    assert logits.shape == (2, 7) and logits.dtype == torch.float32
    assert feature.shape == (2, model.feature_dim)
    assert model.arch == arch
    # the classifier reads exactly the returned feature
    fc = model.fc
    torch.testing.assert_close(logits, F.linear(feature, fc.weight, fc.bias))


def test_unknown_arch_lists_choices():
    with pytest.raises(CnmError) as e:
        build_model("resnet33", 10)
    msg = str(e.value)
    assert "resnet33" in msg and all(name in msg for name in MODELS) and "\n" not in msg


@pytest.mark.parametrize("bad", [{"num_classes": 0}, {"num_classes": 10, "peers": 0}])
def test_bad_sizes_raise_cnm_error(bad):
    with pytest.raises(CnmError):
        build_model("resnet20", **bad)


def test_grouped_build_counts_p_times_the_parameters():
    with torch.device("meta"):
        single = count_parameters(build_model("densenet40_12", 10))
        grouped = count_parameters(build_model("densenet40_12", 10, peers=3))
    assert grouped == 3 * single


def test_grouped_init_has_single_network_scale():
    # fan_out of one peer, not of the whole grouped conv: per-peer std matches a single net.
    torch.manual_seed(1)
    single = build_model("resnet20", 10).layer2[0].conv1.weight
    grouped = build_model("resnet20", 10, peers=4).layer2[0].conv1.weight
    ratio = (grouped.std() / single.std()).item()
    assert 0.9 < ratio < 1.1


# ---- channel-block primitives against a per-peer reference ----------------------------------

def _blocks(x, peers):
    return x.chunk(peers, dim=1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_peer_pad_channels_acts_per_peer(channels_last):
    P, C = 3, 4
    x = torch.randn(2, P * C, 5, 6)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = peer_pad_channels(x, P, 2, 3)
    ref = torch.cat([F.pad(b, (0, 0, 0, 0, 2, 3)) for b in _blocks(x, P)], dim=1)
    assert out.shape == (2, P * (C + 5), 5, 6)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert is_channels_last(out) == channels_last


@pytest.mark.parametrize("channels_last", [False, True])
def test_peer_cat_acts_per_peer(channels_last):
    P = 2
    a, b = torch.randn(2, P * 5, 4, 4), torch.randn(2, P * 3, 4, 4)
    if channels_last:
        a, b = (t.to(memory_format=torch.channels_last) for t in (a, b))
    out = peer_cat([a, b], P)
    ref = torch.cat([torch.cat([pa, pb], 1) for pa, pb in zip(_blocks(a, P), _blocks(b, P))], 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert is_channels_last(out) == channels_last


def test_peer_linear_equals_per_peer_linear():
    P, n_in, n_out = 3, 6, 4
    layer = PeerLinear(n_in, n_out, peers=P)
    x = torch.randn(5, P * n_in)
    ref = torch.cat([F.linear(xp, w, b) for xp, w, b in
                     zip(x.chunk(P, 1), layer.weight.chunk(P, 0), layer.bias.chunk(P, 0))], 1)
    torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=1e-6)
    single = PeerLinear(n_in, n_out)
    assert single.weight.shape == nn.Linear(n_in, n_out).weight.shape


def test_peer_conv_is_block_diagonal():
    P = 2
    conv = PeerConv2d(3, 4, 3, padding=1, peers=P)
    x = torch.randn(1, P * 3, 6, 6)
    x2 = x.clone()
    x2[:, :3] += 1.0                              # change peer 0's input only
    y, y2 = conv(x), conv(x2)
    torch.testing.assert_close(y[:, 4:], y2[:, 4:], rtol=0, atol=0)   # peer 1 unaffected
    assert not torch.allclose(y[:, :4], y2[:, :4])
