"""`cnm bench train` (bench.train): fake step timings, variant applicability, and the real
train step end to end on the CPU with tiny settings."""

from __future__ import annotations

import json

import pytest
import torch

from bench.harness import Workload
from bench.train import VARIANT_NAMES, TrainBenchConfig, run_train_bench, variant_for
from pipeline.errors import CnmError


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def tiny(**kw) -> TrainBenchConfig:
    base = dict(arch="resnet20", peers=2, batch_size=8, device="cpu", num_classes=10, repeats=2,
                steps=2, warmup=1)
    base.update(kw)
    return TrainBenchConfig(**base)


def test_variants_on_cpu_and_cuda():
    cpu = {n: variant_for(n, torch.device("cpu")) for n in VARIANT_NAMES}
    assert all(v.name == n for n, v in cpu.items())
    assert cpu["+grouped"].settings() == {"channels_last": True, "bf16": False, "cuda_graphs": False,
                                          "peer_exec": "grouped"}
    cuda = {n: variant_for(n, torch.device("cuda")) for n in VARIANT_NAMES}
    assert cuda["+grouped"].settings() == {"channels_last": True, "bf16": True, "cuda_graphs": True,
                                           "peer_exec": "grouped"}
    assert cuda["eager-fp32"].settings() == {"channels_last": False, "bf16": False, "cuda_graphs": False,
                                             "peer_exec": "loop"}


def test_fake_step_timings_and_ratios():
    clock = FakeClock()
    # seconds per step by variant: eager 0.1, channels-last 0.05, grouped 0.04
    cost = {"eager-fp32": 0.1, "channels-last": 0.05, "+grouped": 0.04}
    built = []

    def factory(cfg, variant, device):
        built.append(variant.name)

        def step():
            clock.t += cost[variant.name]
            return cfg.batch_size

        return Workload(step=step)

    doc = run_train_bench(tiny(), factory=factory, clock=clock)
    rows = {r["variant"]: r for r in doc["results"]}
    assert built == ["eager-fp32", "channels-last", "+grouped"]  # CUDA-only ones never built
    assert rows["eager-fp32"]["images_per_s"]["median"] == pytest.approx(80.0)
    assert rows["eager-fp32"]["ms_per_step"]["median"] == pytest.approx(100.0)
    assert rows["channels-last"]["ratio_to_eager"] == pytest.approx(2.0)
    assert rows["+grouped"]["ratio_to_eager"] == pytest.approx(2.5)
    assert rows["+grouped"]["ms_per_step"] == pytest.approx({"min": 40.0, "median": 40.0, "max": 40.0})
    for name in ("channels-last+bf16", "+cuda-graphs"):
        assert rows[name]["available"] is False
        assert "not applicable on cpu" in rows[name]["reason"]
    assert doc["bench"] == "train" and doc["baseline"] == "eager-fp32"
    for r in doc["results"]:  # the augment schema's keys are there too
        assert {"pipeline", "available", "images_per_s", "peak_host_mb", "peak_device_mb"} <= set(r)
    json.dumps(doc, allow_nan=False)


def test_factory_refusal_is_reported():
    def factory(cfg, variant, device):
        raise CnmError("unknown architecture 'nope'")

    doc = run_train_bench(tiny(variants=("eager-fp32",)), factory=factory)
    row = doc["results"][0]
    assert row["available"] is False and row["reason"] == "unknown architecture 'nope'"


@pytest.mark.parametrize("kw, msg", [
    (dict(variants=("eager-fp32", "turbo")), "unknown variant"),
    (dict(steps=0), "--steps"),
    (dict(peers=0), "--peers"),
])
def test_bad_settings(kw, msg):
    with pytest.raises(CnmError, match=msg):
        run_train_bench(tiny(**kw), factory=lambda *a: None)


def test_real_step_end_to_end_cpu():
    pytest.importorskip("trainer.step")
    doc = run_train_bench(tiny(variants=("eager-fp32", "+grouped", "+cuda-graphs"), repeats=1))
    rows = {r["variant"]: r for r in doc["results"]}
    for name in ("eager-fp32", "+grouped"):
        assert rows[name]["available"], rows[name].get("reason")
        assert rows[name]["images_per_repeat"] == [16]
        assert rows[name]["ms_per_step"]["median"] > 0
    assert rows["+grouped"]["settings"]["peer_exec"] == "grouped"
    assert rows["+cuda-graphs"]["available"] is False
    assert rows["eager-fp32"]["ratio_to_eager"] == pytest.approx(1.0)


@pytest.mark.gpu
def test_real_step_all_variants_cuda():
    doc = run_train_bench(tiny(device="cuda", steps=3, warmup=4))
    for r in doc["results"]:
        assert r["available"], (r["variant"], r.get("reason"))
        assert r["peak_device_mb"] > 0
