"""The DALI graph inside a user's own pipeline: named external sources fed with feed_input.
(Equality with the reference for every mode is in test_equivalence.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.ops import draw_params, make_params
from pipeline.ops.numpy_baseline import numpy_cutnmix
from tests.pipeline.ops._util import MEAN, STD, assert_views_equal, images

dali = pytest.importorskip("nvidia.dali")


def test_param_batches_layout():
    from pipeline.ops.dali_graph import dali_param_batches, param_names

    p = make_params(
        peers=2,
        batch=2,
        mode="cutnmix",
        pad=4,
        height=32,
        width=32,
        perm=[1, 0],
        offset_y=[0, 8, 4, 1],
        offset_x=[2, 3, 4, 5],
        flip=[1, 0, 0, 1],
        box_h=[3, 0],
        box_w=[5, 0],
        box_y=[7, 0, 29, 0],
        box_x=[1, 0, 27, 0],
    )
    b = dict(zip(param_names("cutnmix"), dali_param_batches(p, 32, 32)))
    assert b["crop_anchor"][0].tolist() == [[-4, -2], [0, 0]]  # (offset - pad) of peers 0 and 1
    assert b["flip"][1].tolist() == [0, 1]
    assert b["paste_ids"][0].tolist() == [0, 1]
    assert b["paste_anchors"][0].tolist() == [[[0, 0], [7, 1]], [[0, 0], [29, 27]]]
    assert b["paste_shapes"][0].tolist() == [[32, 32], [3, 5]] and b["paste_shapes"][1].tolist() == [
        [32, 32],
        [0, 0],
    ]
    assert param_names("mixup") == ("crop_anchor", "flip", "partner", "lam")
    assert param_names("none") == ("crop_anchor", "flip")


@pytest.mark.parametrize("mode", ["cutnmix", "mixup"])
def test_graph_with_named_sources_and_feed_input(mode):
    from pipeline.ops.dali_graph import (
        cutnmix_graph,
        dali_param_batches,
        param_names,
        param_sources,
        stack_views,
    )

    b, peers = 4, 3
    imgs = images(b, 32, 32, seed=8)
    params = draw_params(
        b, peers, 32, 32, mode=mode, mix_prob=1.0, generator=torch.Generator().manual_seed(8)
    )

    @dali.pipeline_def(batch_size=b, num_threads=1, device_id=None)
    def pipe():
        images_node = dali.fn.external_source(name="images", layout="HWC", batch=True)
        nodes = param_sources(mode, prefix="aug_")
        return tuple(
            cutnmix_graph(images_node, nodes, peers=peers, mode=mode, height=32, width=32, mean=MEAN, std=STD)
        )

    p = pipe()
    p.build()
    p.feed_input("images", [x for x in imgs.numpy()])
    for name, batch in zip(param_names(mode), dali_param_batches(params, 32, 32)):
        p.feed_input("aug_" + name, batch)
    views = stack_views(p.run(), torch.bfloat16)
    expected = numpy_cutnmix(imgs, torch.arange(b), params, mean=MEAN, std=STD, out_dtype=torch.bfloat16)[0]
    assert_views_equal(views, expected)
    assert np.isfinite(views.float().numpy()).all()
