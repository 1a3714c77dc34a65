"""Properties of Cut^nMix (issue 3): what the views contain, and the laws of the draws."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.ops import cutnmix, draw_params
from tests.pipeline.ops._util import MEAN, STD, images

# scipy comes with the `dev` extra; a bare GPU box that runs `pytest -m gpu` may lack it.
stats = pytest.importorskip("scipy.stats")

N = 20000  # draws for the distribution tests (draw_params only: no images needed)


def box_masks(params, h, w) -> torch.Tensor:
    """bool [P,B,H,W]: inside peer k's box for sample i."""
    ys, xs = torch.arange(h), torch.arange(w)
    by, bx = params.box_y[..., None], params.box_x[..., None]
    bh, bw = params.box_h[:, None], params.box_w[:, None]
    rows = (ys >= by) & (ys < by + bh)
    cols = (xs >= bx) & (xs < bx + bw)
    return rows[..., :, None] & cols[..., None, :]


@pytest.mark.parametrize("mode", ["cutnmix", "cutmix"])
def test_outside_box_own_view_inside_partner_view(mode):
    b, p, h, w = 16, 3, 32, 32
    imgs = images(b, h, w, seed=1)
    params = draw_params(b, p, h, w, mode=mode, mix_prob=1.0, generator=torch.Generator().manual_seed(1))
    views = cutnmix(imgs, torch.arange(b), params, mean=MEAN, std=STD, out_dtype=torch.float32)[0]
    base = cutnmix(
        imgs,
        torch.arange(b),
        dataclasses.replace(params, mode="none"),
        mean=MEAN,
        std=STD,
        out_dtype=torch.float32,
    )[0]
    partner_base = base[:, params.perm]  # [P,B,...]: the partner's peer-k base view
    inside = box_masks(params, h, w)[:, :, None].expand(p, b, 3, h, w)
    assert bool(inside.any()) and bool((~inside).any())
    assert torch.equal(views[inside], partner_base[inside])
    assert torch.equal(views[~inside], base[~inside])


def test_cutnmix_shares_lam_and_box_size_positions_differ():
    params = draw_params(
        N, 3, 32, 32, mode="cutnmix", mix_prob=1.0, generator=torch.Generator().manual_seed(2)
    )
    assert params.box_h.shape == (N,) and params.lam.shape == (N,)  # one size and lam per sample
    # positions are independent per peer: where a box has room to move they rarely coincide
    room = (params.box_h <= 24) & (params.box_w <= 24)
    same = (params.box_y[0] == params.box_y[1]) & (params.box_x[0] == params.box_x[1])
    assert float(same[room].float().mean()) < 0.05
    # and, given the shared size, peer positions are uncorrelated (positions scaled to [0, 1))
    u = (params.box_y + 0.5) / (32 - params.box_h + 1)
    r = np.corrcoef(u[0][room].numpy(), u[2][room].numpy())[0, 1]
    assert abs(r) < 0.05


def test_cutmix_positions_coincide():
    params = draw_params(
        500, 4, 32, 32, mode="cutmix", mix_prob=1.0, generator=torch.Generator().manual_seed(3)
    )
    assert bool((params.box_y == params.box_y[:1]).all() and (params.box_x == params.box_x[:1]).all())
    assert float((params.box_y[0] > 0).float().mean()) > 0.3  # not all at the origin


@pytest.mark.parametrize("mode", ["cutnmix", "cutmix"])
@pytest.mark.parametrize("hw", [(32, 32), (24, 40)])
def test_lam_is_one_minus_box_area_and_box_inside(mode, hw):
    h, w = hw
    params = draw_params(
        N, 3, h, w, mode=mode, mix_prob=0.5, alpha=0.7, generator=torch.Generator().manual_seed(4)
    )
    area = (params.box_h * params.box_w).to(torch.float32)
    assert torch.equal(params.lam, 1 - area / float(h * w))  # the float32 formula, bit for bit
    if h * w == 1024:  # exact in binary: lam * 1024 is an integer
        assert torch.equal(params.lam.double(), 1 - area.double() / 1024)
    assert bool((params.box_y >= 0).all() and (params.box_y + params.box_h <= h).all())
    assert bool((params.box_x >= 0).all() and (params.box_x + params.box_w <= w).all())
    unmixed = ~params.mixed
    assert bool((params.lam[unmixed] == 1).all() and (params.box_h[unmixed] == 0).all())
    assert bool((params.box_h[params.mixed] >= 0).all())


def side_cdf(t, alpha):
    """CDF of the box side fraction s = sqrt(1 - l), l ~ Beta(alpha, alpha)."""
    return stats.beta.sf(1.0 - np.square(t), alpha, alpha)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_box_side_follows_beta_ks(alpha):
    """KS test of h/H against the law of sqrt(1 - Beta(a, a)); H = 4096 makes the rounding of
    the side to whole pixels (<= 1/8192) negligible against the KS tolerance (~0.01)."""
    h = w = 4096
    params = draw_params(
        N, 1, h, w, mode="cutnmix", alpha=alpha, mix_prob=1.0, generator=torch.Generator().manual_seed(5)
    )
    s = params.box_h.double().numpy() / h
    assert np.array_equal(params.box_h.numpy(), params.box_w.numpy())  # square image: square box
    result = stats.kstest(s, lambda t: side_cdf(np.clip(t, 0, 1), alpha))
    assert result.pvalue > 0.01, result
    # and a wrong law is rejected by the same test (the test has power)
    assert stats.kstest(s, lambda t: side_cdf(np.clip(t, 0, 1), alpha * 3)).pvalue < 1e-6


def test_box_side_rounding_at_cifar_size_chi_square():
    """At H = 32 the side is round(32 * s): compare the counts of every side with the exact
    probabilities of the rounding intervals (chi-square, sparse bins merged)."""
    h, alpha = 32, 1.0
    params = draw_params(
        N, 1, h, h, mode="cutnmix", alpha=alpha, mix_prob=1.0, generator=torch.Generator().manual_seed(6)
    )
    counts = np.bincount(params.box_h.numpy(), minlength=h + 1).astype(float)
    edges = np.clip((np.arange(h + 2) - 0.5) / h, 0, 1)  # side m <=> s in [(m-.5)/32, (m+.5)/32)
    probs = np.diff(side_cdf(edges, alpha))
    keep = probs * N >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(probs[keep], probs[~keep].sum()) * N
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 0.01


@pytest.mark.parametrize("axis", ["y", "x"])
def test_positions_uniform_chi_square(axis):
    h = w = 32
    params = draw_params(N, 2, h, w, mode="cutnmix", mix_prob=1.0, generator=torch.Generator().manual_seed(7))
    pos = (params.box_y if axis == "y" else params.box_x).numpy()
    side = (params.box_h if axis == "y" else params.box_w).numpy()
    tested = 0
    for size in (8, 16, 24):  # given the side, the position is uniform on 0..H-side
        sel = side == size
        counts = np.bincount(pos[:, sel].reshape(-1), minlength=h - size + 1)
        assert counts.shape[0] == h - size + 1  # never beyond H - side
        assert stats.chisquare(counts).pvalue > 0.001
        tested += int(sel.sum())
    assert tested > 1000


@pytest.mark.parametrize("mix_prob", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("mode", ["cutnmix", "mixup"])
def test_mix_prob_respected(mix_prob, mode):
    params = draw_params(
        N, 2, 32, 32, mode=mode, mix_prob=mix_prob, generator=torch.Generator().manual_seed(8)
    )
    k = int(params.mixed.sum())
    sd = np.sqrt(N * mix_prob * (1 - mix_prob))
    assert abs(k - N * mix_prob) <= 5 * sd  # binomial bounds (exact at 0 and 1)
    assert bool((params.lam[~params.mixed] == 1).all())


def test_mixup_lam_follows_beta():
    alpha = 0.4
    params = draw_params(
        N, 2, 32, 32, mode="mixup", alpha=alpha, mix_prob=1.0, generator=torch.Generator().manual_seed(9)
    )
    assert stats.kstest(params.lam.double().numpy(), stats.beta(alpha, alpha).cdf).pvalue > 0.01
    assert bool((params.box_h == 0).all())


def test_none_mode_is_identity_mix():
    params = draw_params(
        100, 3, 32, 32, mode="none", mix_prob=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert params.perm.tolist() == list(range(100))
    assert bool((params.lam == 1).all() and ~params.mixed.any() and (params.box_h == 0).all())


def test_crop_offsets_and_flips_uniform():
    pad = 4
    params = draw_params(N, 3, 32, 32, pad=pad, generator=torch.Generator().manual_seed(10))
    for off in (params.offset_y, params.offset_x):
        counts = np.bincount(off.reshape(-1).numpy(), minlength=2 * pad + 1)
        assert counts.shape[0] == 2 * pad + 1 and stats.chisquare(counts).pvalue > 0.001
    frac = float(params.flip.float().mean())
    assert abs(frac - 0.5) < 5 * np.sqrt(0.25 / params.flip.numel())
    # independent per peer: peers' offsets are uncorrelated
    assert abs(np.corrcoef(params.offset_x[0].numpy(), params.offset_x[1].numpy())[0, 1]) < 0.05
    no_flip = draw_params(100, 3, 32, 32, flip=False, generator=torch.Generator().manual_seed(10))
    assert not bool(no_flip.flip.any())


def test_perm_is_a_permutation_shared_by_peers():
    params = draw_params(257, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    assert sorted(params.perm.tolist()) == list(range(257))
    assert params.perm.tolist() != list(range(257))
