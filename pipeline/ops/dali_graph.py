"""Cut^nMix as a DALI graph: the same augmentation from DALI operators, fed drawn parameters.

Same semantics as `pipeline.ops.reference` (docs/design.md#cutnmix-views; Shen et al.,
arXiv 2206.12370 as formulated by this project), so the DALI loader can deliver finished views.
DALI has no CutMix operator; the graph is, for every peer k:

    base_k  = fn.flip(fn.slice(images, start=crop_anchor[k], shape=[H, W], axis_names="HW",
                               out_of_bounds_policy="pad", fill_values=0),
                      horizontal=flip[k])                      # pad, crop, then flip
    box modes: mixed_k = fn.multi_paste(base_k, in_ids=[i, perm[i]],
                               in_anchors=out_anchors=[[0,0], [box_y, box_x]],
                               shapes=[[H, W], [box_h, box_w]], output_size=[H, W])
               (first paste: the sample's own view; second: the partner's peer-k view in the
                box; later pastes overwrite earlier ones; an empty box is a 0 x 0 paste)
               view_k  = (float(mixed_k) - mean32) * inv_std32
    mixup:     partner_k = fn.multi_paste(base_k, in_ids=[perm[i]], output_size=[H, W])
               view_k  = lam * norm(base_k) + (1 - lam) * norm(partner_k)
    none:      view_k  = norm(base_k)

Outputs are float32 HWC (the dtype cast and the [P,B,3,H,W] channels-last stacking happen in
torch, bit-identical to the other paths). On the CPU (device_id=None) the graph equals the
reference bit for bit in float32 (tested). On the GPU DALI fuses the arithmetic into one kernel
that may contract the mixup blend into FMAs (within one float32 ulp).

Parameters come in per sample through `fn.external_source` (see `param_sources`), in the
layout `dali_param_batches` produces from a `CutNMixParams` (`param_names(mode)` lists them).
Inside your own pipeline definition:

    nodes = param_sources(mode, source=lambda: dali_param_batches(next_params(), 32, 32))
    views = cutnmix_graph(images, nodes, peers=P, mode=mode, height=32, width=32, mean=m, std=s)
nvidia.dali is imported inside the functions only.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from pipeline import backends
from pipeline.ops.params import (
    BOX_MODES,
    CutNMixParams,
    check_images,
    check_mode,
    norm_constants,
    resolve_dtype,
)

# per-sample arrays fed through external_source (one batch = a list of B arrays each):
PARAM_NAMES = (
    "crop_anchor",  # int32 [P,2]: (offset_y - pad, offset_x - pad), the crop's top-left in the image
    "flip",  # int32 [P]: 1 = flip the crop left-right
    "paste_ids",  # int32 [2]: (i, perm[i])
    "paste_anchors",  # int32 [P,2,2]: ((0,0), (box_y[k,i], box_x[k,i])) per peer
    "paste_shapes",  # int32 [2,2]: ((H,W), (box_h[i], box_w[i]))
    "partner",  # int32 [1]: (perm[i],)
    "lam",  # float32 []: lam[i]
)


def param_names(mode: str) -> tuple[str, ...]:
    """The PARAM_NAMES a mode's graph reads, in PARAM_NAMES order."""
    check_mode(mode)
    if mode in BOX_MODES:
        return PARAM_NAMES[:5]
    if mode == "mixup":
        return ("crop_anchor", "flip", "partner", "lam")
    return ("crop_anchor", "flip")


def dali_param_batches(params: CutNMixParams, height: int, width: int) -> tuple[list[np.ndarray], ...]:
    """CutNMixParams -> one batch (a list of B numpy arrays) per name of `param_names(mode)`."""
    d = params.numpy()
    P, B, pad = params.peers, params.batch, params.pad
    i32 = np.int32
    crop = np.stack([d["offset_y"] - pad, d["offset_x"] - pad], axis=-1).astype(i32)  # [P,B,2]
    flip = d["flip"].astype(i32)  # [P,B]
    perm = d["perm"].astype(i32)
    anchors = np.zeros((P, B, 2, 2), dtype=i32)
    anchors[:, :, 1, 0] = d["box_y"]
    anchors[:, :, 1, 1] = d["box_x"]
    shapes = np.zeros((B, 2, 2), dtype=i32)
    shapes[:, 0] = (height, width)
    shapes[:, 1, 0] = d["box_h"]
    shapes[:, 1, 1] = d["box_w"]
    lam = d["lam"].astype(np.float32)
    batches = {
        "crop_anchor": [np.ascontiguousarray(crop[:, i]) for i in range(B)],
        "flip": [np.ascontiguousarray(flip[:, i]) for i in range(B)],
        "paste_ids": [np.array([i, perm[i]], dtype=i32) for i in range(B)],
        "paste_anchors": [np.ascontiguousarray(anchors[:, i]) for i in range(B)],
        "paste_shapes": [shapes[i] for i in range(B)],
        "partner": [np.array([perm[i]], dtype=i32) for i in range(B)],
        "lam": [np.array(lam[i], dtype=np.float32) for i in range(B)],
    }
    return tuple(batches[n] for n in param_names(params.mode))


def param_sources(mode: str, source: Callable[[], tuple] | None = None, prefix: str = "cnm_") -> dict:
    """Inside a pipeline definition: the parameter nodes, {name in param_names(mode): DataNode}.

    With `source`: one external source with num_outputs=len(param_names(mode)); `source()` must
    return the tuple `dali_param_batches(...)` for the next batch (DALI calls it once per
    iteration). Without: one named external source per parameter, `prefix + name`, to feed
    yourself (`pipe.feed_input(prefix + name, batch)` with the batches of `dali_param_batches`).
    """
    fn = backends.require("nvidia.dali", "the DALI Cut^nMix graph").fn
    names = param_names(mode)
    if source is not None:
        nodes = fn.external_source(source=source, num_outputs=len(names), batch=True)
    else:
        nodes = [fn.external_source(name=prefix + n, batch=True) for n in names]
    return dict(zip(names, nodes))


def cutnmix_graph(
    images,
    nodes: dict,
    *,
    peers: int,
    mode: str,
    height: int,
    width: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> list:
    """Inside a pipeline definition: images (uint8 HWC node, CPU or GPU) -> P float32 HWC view nodes.

    nodes: the dict of `param_sources`. The P outputs are the peers' normalised views (float32,
    HWC); stack them as [P,B,H,W,3] and permute to [P,B,3,H,W] for the batch contract.
    """
    dali = backends.require("nvidia.dali", "the DALI Cut^nMix graph")
    fn, types = dali.fn, dali.types
    check_mode(mode)
    mean32, inv_std32 = norm_constants(mean, std)
    mean_c = types.Constant(mean32)
    inv_c = types.Constant(inv_std32)

    def norm(x):
        return (fn.cast(x, dtype=types.FLOAT) - mean_c) * inv_c

    views = []
    for k in range(peers):
        crop = fn.slice(
            images,
            start=nodes["crop_anchor"][k],
            shape=[height, width],
            axis_names="HW",
            out_of_bounds_policy="pad",
            fill_values=0,
        )
        base = fn.flip(crop, horizontal=nodes["flip"][k])
        if mode in BOX_MODES:
            anchors = nodes["paste_anchors"][k]
            mixed = fn.multi_paste(
                base,
                in_ids=nodes["paste_ids"],
                in_anchors=anchors,
                out_anchors=anchors,
                shapes=nodes["paste_shapes"],
                output_size=[height, width],
            )
            views.append(norm(mixed))
        elif mode == "mixup":
            partner = fn.multi_paste(base, in_ids=nodes["partner"], output_size=[height, width])
            lam = nodes["lam"]
            views.append(lam * norm(base) + (1.0 - lam) * norm(partner))
        else:
            views.append(norm(base))
    return views


def stack_views(outputs: Sequence, out_dtype=torch.float32) -> torch.Tensor:
    """P DALI float32 HWC batches (TensorList-like, or lists of arrays) -> torch [P,B,3,H,W]
    out_dtype with each views[k] channels-last (CPU)."""
    per_peer = []
    for out in outputs:
        if hasattr(out, "as_array"):
            arr = out.as_array()
        else:
            arr = np.stack([np.asarray(t) for t in out])
        per_peer.append(arr)
    views = torch.from_numpy(np.stack(per_peer)).to(resolve_dtype(out_dtype))  # [P,B,H,W,3]
    return views.permute(0, 1, 4, 2, 3)


def run_dali_graph(
    images,
    params: CutNMixParams,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    out_dtype=torch.float32,
    num_threads: int = 1,
) -> torch.Tensor:
    """Build a CPU pipeline (device_id=None) of the graph, run it once on these images and
    params, return views torch [P,B,3,H,W] out_dtype (channels-last per peer). For tests."""
    dali = backends.require("nvidia.dali", "the DALI Cut^nMix graph")
    imgs = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    b, h, w = check_images(torch.from_numpy(imgs))
    batches = dali_param_batches(params, h, w)
    image_batch = [np.ascontiguousarray(imgs[i]) for i in range(b)]

    @dali.pipeline_def(batch_size=b, num_threads=num_threads, device_id=None, prefetch_queue_depth=1)
    def pipe():
        images_node = dali.fn.external_source(source=lambda: image_batch, batch=True, layout="HWC")
        nodes = param_sources(params.mode, lambda: batches)
        return tuple(
            cutnmix_graph(
                images_node,
                nodes,
                peers=params.peers,
                mode=params.mode,
                height=h,
                width=w,
                mean=mean,
                std=std,
            )
        )

    p = pipe()
    p.build()
    outputs = p.run()
    return stack_views(outputs, out_dtype)
