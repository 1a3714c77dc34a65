"""Every Cut^nMix implementation equals the reference (issue 3, "Tests that must exist").

Exact in float32; in bf16/fp16 the torch/numba/numpy/DALI paths round once with torch and are
exact too, the Triton interpreter converts with numpy and may differ by one ulp.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline import backends
from pipeline.errors import CnmError
from pipeline.ops import MODES, cutnmix, draw_params, grouped_layout, make_params, numba_impl
from pipeline.ops.numpy_baseline import numpy_cutnmix
from tests.pipeline.ops._util import MEAN, STD, assert_views_equal, images, interpreter_only

# numba comes with ffcv: where it is missing (e.g. a bare GPU box) its checks drop out
FAST = ["torch", "numpy"] + (["numba"] if numba_impl.available() else [])
COMPILED_CPU = ["torch"] + (["numba"] if numba_impl.available() else [])


def run(impl, imgs, labels, params, dtype=torch.float32):
    """views of one implementation (reference/torch/numba/triton via cutnmix; numpy; dali)."""
    if impl == "numpy":
        return numpy_cutnmix(imgs, labels, params, mean=MEAN, std=STD, out_dtype=dtype)[0]
    if impl == "dali":
        from pipeline.ops.dali_graph import run_dali_graph

        return run_dali_graph(imgs, params, mean=MEAN, std=STD, out_dtype=dtype)
    return cutnmix(imgs, labels, params, mean=MEAN, std=STD, out_dtype=dtype, impl=impl)[0]


def all_impls():
    impls = list(FAST)
    if backends.available("nvidia.dali"):
        impls.append("dali")
    return impls


def check_all(imgs, params, dtype=torch.float32, triton=True):
    labels = torch.arange(imgs.shape[0])
    ref = run("reference", imgs, labels, params, dtype)
    for impl in all_impls():
        assert_views_equal(run(impl, imgs, labels, params, dtype), ref)
    if triton:
        check_triton(imgs, labels, params, dtype, ref)
    return ref


def check_triton(imgs, labels, params, dtype, ref):
    import os

    if os.environ.get("TRITON_INTERPRET") == "1" and backends.available("triton"):
        ulps = 0 if dtype == torch.float32 else 1
        assert_views_equal(run("triton", imgs, labels, params, dtype), ref, ulps=ulps)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("peers", [1, 2, 3, 4, 5])
def test_all_impls_equal_reference_fp32(mode, peers):
    b, h, w = 5, 6, 7  # odd batch, non-square
    g = torch.Generator().manual_seed(100 + peers)
    params = draw_params(b, peers, h, w, mode=mode, alpha=1.0, mix_prob=0.7, pad=2, generator=g)
    if mode != "none":
        assert bool(params.mixed.any())  # the case exercises mixing
    check_all(images(b, h, w, seed=peers), params)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_all_impls_equal_reference_half(mode, dtype):
    b, h, w, p = 3, 5, 8, 3
    params = draw_params(
        b, p, h, w, mode=mode, mix_prob=1.0, pad=3, generator=torch.Generator().manual_seed(7)
    )
    check_all(images(b, h, w, seed=3), params, dtype)


@pytest.mark.parametrize("mode", MODES)
def test_batch_of_one(mode):
    params = draw_params(
        1, 2, 5, 5, mode=mode, mix_prob=1.0, pad=2, generator=torch.Generator().manual_seed(1)
    )
    assert params.perm.tolist() == [0]  # mixing with itself
    check_all(images(1, 5, 5, seed=4), params)


def test_cifar_size():
    g = torch.Generator().manual_seed(5)
    params = draw_params(3, 3, 32, 32, mode="cutnmix", mix_prob=1.0, pad=4, generator=g)
    check_all(images(3, 32, 32, seed=5), params, torch.bfloat16)


H, W, PAD = 6, 7, 2


def edge(**kw):
    base = dict(peers=2, batch=3, mode="cutnmix", pad=PAD, height=H, width=W, perm=[2, 0, 1])
    base.update(kw)
    return make_params(**base)


EDGE_CASES = {
    # lam = 0: the whole image is the partner's, for both peers
    "full_box_lam0": edge(box_h=[H, H, 0], box_w=[W, W, 0]),
    # lam near 1: 1x1 boxes in the corners
    "unit_box_corners": edge(
        box_h=[1, 1, 1], box_w=[1, 1, 1], box_y=[0, H - 1, 0, H - 1, 0, 0], box_x=[W - 1, 0, 0, W - 1, 0, 0]
    ),
    # strips touching the right and bottom borders
    "strips_on_borders": edge(
        box_h=[H, 1, H - 1],
        box_w=[1, W, W - 1],
        box_y=[0, H - 1, 1, 0, H - 1, 0],
        box_x=[W - 1, 0, 1, W - 1, 0, 1],
    ),
    # extreme crops (offset 0 and 2*pad, i.e. padding on either side), with and without flips
    "extreme_crops": edge(
        offset_y=[0, 2 * PAD, 0, 2 * PAD, PAD, 0],
        offset_x=[2 * PAD, 0, 0, 2 * PAD, 0, PAD],
        flip=[1, 0, 1, 1, 0, 1],
        box_h=[3, 2, 4],
        box_w=[2, 5, 3],
        box_y=[0, 4, 2, 1, 0, 2],
        box_x=[5, 0, 4, 2, 1, 0],
    ),
    # pad larger than the image: some crops lie entirely in the zero padding
    "crop_in_padding": make_params(
        peers=2,
        batch=3,
        mode="cutnmix",
        pad=8,
        height=H,
        width=W,
        perm=[1, 2, 0],
        offset_y=[0, 16, 8, 3, 0, 16],
        offset_x=[16, 0, 8, 0, 12, 16],
        flip=[0, 1, 1, 0, 1, 0],
        box_h=[2, H, 0],
        box_w=[3, W, 0],
        box_y=[4, 0, 0, 1, 0, 0],
        box_x=[4, 0, 0, 1, 0, 0],
    ),
    # cutmix: one box position for every peer
    "cutmix_shared_box": edge(
        mode="cutmix",
        box_h=[3, 5, 2],
        box_w=[4, 2, 7],
        box_y=[3, 1, 4, 3, 1, 4],
        box_x=[3, 5, 0, 3, 5, 0],
        flip=[1, 0, 0, 1, 1, 0],
    ),
    # mixup with lam exactly 0, exactly 1 and nearly 1
    "mixup_lam_extremes": edge(
        mode="mixup",
        mixed=[1, 0, 1],
        lam=[0.0, 1.0, 0.9999999],
        offset_y=[0, 4, 1, 2, 3, 4],
        flip=[1, 0, 1, 0, 0, 1],
    ),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_cases(case):
    params = EDGE_CASES[case]
    check_all(images(params.batch, H, W, seed=11), params)


def test_edge_case_lam_values():
    assert EDGE_CASES["full_box_lam0"].lam.tolist() == [0.0, 0.0, 1.0]
    assert (
        EDGE_CASES["unit_box_corners"].lam.tolist() == [np.float32(1) - np.float32(1) / np.float32(H * W)] * 3
    )


def test_identity_base_view():
    """pad=0, flip=False, no mixing: views are the normalised images."""
    imgs = images(4, 5, 6)
    params = draw_params(
        4, 3, 5, 6, mode="none", pad=0, flip=False, generator=torch.Generator().manual_seed(0)
    )
    expected = ((imgs.float() - torch.tensor(MEAN)) / torch.tensor(STD)).permute(0, 3, 1, 2)
    for impl in ["reference"] + all_impls():
        views = run(impl, imgs, torch.arange(4), params)
        for k in range(3):
            torch.testing.assert_close(views[k], expected, rtol=2e-7, atol=1e-6)


def test_reference_on_a_hand_computed_example():
    """Pad 1, crop at (0, 2), then flip; 1x2 boxes from the partner, one place per peer; mean 0, std 1."""
    img0 = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.uint8)
    img1 = torch.tensor([[7, 8, 9], [10, 11, 12]], dtype=torch.uint8)
    imgs = torch.stack([img0, img1])[..., None].expand(2, 2, 3, 3).contiguous()
    params = make_params(
        peers=2,
        batch=2,
        mode="cutnmix",
        pad=1,
        height=2,
        width=3,
        perm=[1, 0],
        offset_y=[0, 1, 1, 1],
        offset_x=[2, 1, 1, 1],
        flip=[1, 0, 0, 0],
        box_h=[1, 0],
        box_w=[2, 0],
        box_y=[0, 0, 1, 0],
        box_x=[1, 0, 0, 0],
    )
    for impl in ["reference"] + all_impls():
        labels = torch.tensor([3, 4])
        if impl in ("reference", "torch", "numba"):
            views, y_a, y_b, lam = cutnmix(
                imgs, labels, params, mean=(0, 0, 0), std=(1, 1, 1), out_dtype=torch.float32, impl=impl
            )
            assert y_a.tolist() == [3, 4] and y_b.tolist() == [4, 3]
            assert lam.tolist() == [np.float32(1) - np.float32(2) / np.float32(6), 1.0]  # float32 formula
        elif impl == "numpy":
            views = numpy_cutnmix(imgs, labels, params, mean=(0, 0, 0), std=(1, 1, 1))[0]
        else:
            from pipeline.ops.dali_graph import run_dali_graph

            views = run_dali_graph(imgs, params, mean=(0, 0, 0), std=(1, 1, 1))
        v = views[:, :, 0]  # channel 0 (all channels are equal here)
        # peer 0, sample 0: base = flip(crop at (0,2) of the padded image) = [[0,0,0],[0,3,2]],
        # then its 1x2 box at (0,1) comes from sample 1's peer-0 base view (the identity crop)
        assert v[0, 0].tolist() == [[0, 8, 9], [0, 3, 2]], impl
        # peer 1, sample 0: identity base view, the same 1x2 box size at its own place (1,0)
        assert v[1, 0].tolist() == [[1, 2, 3], [10, 11, 6]], impl
        assert v[0, 1].tolist() == [[7, 8, 9], [10, 11, 12]], impl  # unmixed


@pytest.mark.parametrize("mode", MODES)
def test_fast_paths_agree_on_a_big_batch(mode):
    """torch and numba equal the per-sample numpy path (itself checked against the reference
    above) on a CIFAR-size batch that exercises the parallel loops."""
    b = 97
    params = draw_params(b, 3, 32, 32, mode=mode, generator=torch.Generator().manual_seed(9))
    imgs = images(b, 32, 32, seed=9)
    labels = torch.arange(b)
    for dtype in (torch.float32, torch.bfloat16):
        expected = run("numpy", imgs, labels, params, dtype)
        for impl in COMPILED_CPU:
            assert_views_equal(run(impl, imgs, labels, params, dtype), expected)


@interpreter_only
def test_triton_interpreter_on_cifar_size_all_modes():
    b = 3
    imgs = images(b, 32, 32, seed=2)
    for mode in MODES:
        params = draw_params(
            b, 3, 32, 32, mode=mode, mix_prob=1.0, generator=torch.Generator().manual_seed(2)
        )
        expected = run("numpy", imgs, torch.arange(b), params)
        assert_views_equal(run("triton", imgs, torch.arange(b), params), expected)


def test_params_with_other_mode_change_only_the_mixing():
    """Same draws in every mode: replacing the mode keeps the base views (draw order contract)."""
    g = lambda: torch.Generator().manual_seed(3)
    p_mix = draw_params(6, 2, 8, 8, mode="cutnmix", mix_prob=1.0, generator=g())
    p_none = draw_params(6, 2, 8, 8, mode="none", generator=g())
    for f in ("offset_y", "offset_x", "flip"):
        assert torch.equal(getattr(p_mix, f), getattr(p_none, f))
    p_cut = draw_params(6, 2, 8, 8, mode="cutmix", mix_prob=1.0, generator=g())
    assert torch.equal(p_cut.box_h, p_mix.box_h) and torch.equal(p_cut.perm, p_mix.perm)
    assert dataclasses.replace(p_none, mode="none").perm.tolist() == list(range(6))


@interpreter_only
@pytest.mark.parametrize("hw", [(3, 4), (4, 12), (2, 16), (3, 8), (5, 24)])
@pytest.mark.parametrize("mode", ["cutnmix", "mixup"])
def test_triton_every_pixels_per_thread(mode, hw):
    """The kernel's thread runs of 4, 8 and 16 pixels (gcd(W, 16)), with and without idle threads
    (H or W not a power of two), odd batch, equal the reference in float32 and float16."""
    from pipeline.ops.triton_impl import launch_config

    h, w = hw
    assert launch_config(h, w)["PPT"] == math.gcd(w, 16)
    params = draw_params(
        5, 3, h, w, mode=mode, mix_prob=1.0, pad=3, generator=torch.Generator().manual_seed(w)
    )
    check_all(images(5, h, w, seed=w), params, torch.float32)
    check_all(images(5, h, w, seed=w), params, torch.float16)


@interpreter_only
@pytest.mark.parametrize("h", [4, 5])  # every thread busy / idle threads (40 pixels, 8 runs of 8)
@pytest.mark.parametrize("mode", MODES)
def test_triton_grouped_layout_equals_converted_views(mode, h):
    """layout="grouped" (written by the kernel) equals the reference's views converted by
    `grouped_layout` and by the trainer's `views_to_grouped_input`, and is channels-last."""
    from trainer.peers import views_to_grouped_input

    b, w, p = 3, 8, 3
    params = draw_params(b, p, h, w, mode=mode, mix_prob=1.0, pad=2, generator=torch.Generator().manual_seed(6))
    imgs = images(b, h, w, seed=6)
    labels = torch.arange(b)
    ref = run("reference", imgs, labels, params)
    expected = views_to_grouped_input(ref)
    assert torch.equal(grouped_layout(ref), expected)
    for impl in ["triton", "reference", *COMPILED_CPU]:
        got = cutnmix(imgs, labels, params, mean=MEAN, std=STD, out_dtype=torch.float32, impl=impl, layout="grouped")[0]
        assert got.shape == (b, p * 3, h, w) and got.is_contiguous(memory_format=torch.channels_last), impl
        assert_views_equal(got, expected)


def test_bad_layout_is_one_line_error():
    params = make_params(peers=1, batch=2, height=4, width=4)
    with pytest.raises(CnmError, match="unknown Cut.nMix output layout 'nchw'"):
        cutnmix(images(2, 4, 4), torch.arange(2), params, layout="nchw")


@interpreter_only
@interpreter_only
@pytest.mark.parametrize("mode, peers", [("mixup", 5), ("cutnmix", 9)])
def test_triton_many_peers_with_runs_of_16(mode, peers):
    """At 16 pixels per thread, 256 gathered pixels per thread (mixup P=5: 2 per output pixel, P
    padded to 8; cutnmix P=9, padded to 16) take two gathers; the views equal the reference."""
    b, h, w = 3, 2, 16
    params = draw_params(b, peers, h, w, mode=mode, mix_prob=1.0, pad=3, generator=torch.Generator().manual_seed(peers))
    check_all(images(b, h, w, seed=peers), params, torch.float16)


@interpreter_only
@pytest.mark.parametrize("pad", [5, 9])
def test_triton_pad_wider_than_the_image(pad):
    """pad > W: whole thread runs in the zero padding (the kernel points them at a zero slot) and
    runs reaching past both image edges equal the reference."""
    b, h, w = 3, 4, 4
    params = draw_params(b, 2, h, w, mode="cutnmix", mix_prob=1.0, pad=pad, generator=torch.Generator().manual_seed(pad))
    check_all(images(b, h, w, seed=pad), params, torch.float32)


@interpreter_only
def test_triton_unaligned_images_use_byte_loads():
    """A contiguous view starting at an odd address (no 8-byte loads possible) gives the same views."""
    b = 2
    flat = torch.zeros(b * 32 * 32 * 3 + 1, dtype=torch.uint8)
    imgs = flat[1:].view(b, 32, 32, 3)
    imgs.copy_(images(b, 32, 32, seed=8))
    assert imgs.is_contiguous() and imgs.data_ptr() % 8 != 0
    params = draw_params(b, 2, 32, 32, mode="cutnmix", mix_prob=1.0, generator=torch.Generator().manual_seed(8))
    expected = run("numpy", imgs, torch.arange(b), params)
    assert_views_equal(run("triton", imgs, torch.arange(b), params), expected)
