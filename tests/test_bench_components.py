"""benchmarks/_components.py: the per-component GFLOPs and time of speed.py's breakdown add up."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import IMG, make_vit

import inti_adapters as ia

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _components import COMPONENTS, PRODUCTS, component_gflops, component_times  # noqa: E402

TEMPORAL = [{"name": "local_mhra", "blocks": "all"}]


def _model(temporal=()):
    return ia.inject(make_vit(), layers=[1, 2], temporal=list(temporal)).train()


@pytest.mark.parametrize("temporal", [(), TEMPORAL], ids=["inti", "inti+local_mhra"])
def test_component_gflops_add_up_and_match_the_modules(temporal):
    model, video = _model(temporal), torch.randn(2, 3, 4, IMG, IMG)
    parts = component_gflops(model, video)
    assert set(parts) == set(COMPONENTS)
    assert sum(parts.values()) == pytest.approx(ia.count_gflops(model, video), rel=1e-9)
    counter = ia.FlopCounter()
    with torch.no_grad(), counter:
        model(video)
    by_module = counter.gflops_by_module()
    compressors = sum(v for k, v in by_module.items() if k.count(".") == 2 and ".compressors." in k)
    assert parts["compressors"] == pytest.approx(compressors, rel=1e-9)
    assert (parts["temporal adapters"] > 0) == bool(temporal)
    assert parts["blocks"] > parts["compressors"] > 0 and parts["other"] > 0  # patch embedding


@pytest.mark.parametrize("temporal", [(), TEMPORAL], ids=["inti", "inti+local_mhra"])
def test_component_times_add_up_to_the_profiled_step(temporal):
    model, video = _model(temporal), torch.randn(2, 3, 4, IMG, IMG)
    labels = torch.tensor([0, 1])

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(video), labels).backward()

    fwd_bwd()
    times = component_times(model, fwd_bwd, torch.device("cpu"))
    assert sum(times[c] for c in COMPONENTS) == pytest.approx(times["total"], rel=1e-6)
    assert all(times[c] > 0 for c in ("blocks", "compressors", "head/pool"))
    assert (times["temporal adapters"] > 0) == bool(temporal)
    assert times["blocks"] > times["head/pool"]
    # the matrix products / convolutions inside each component: part of its time, never more
    assert all(0 < times[PRODUCTS + c] < times[c] for c in ("blocks", "compressors"))
    assert times[PRODUCTS + "head/pool"] < times["head/pool"]
    assert (times[PRODUCTS + "temporal adapters"] > 0) == bool(temporal)
    assert model.forward_head.__func__ is ia.InTIModel.forward_head  # the tracker's wrapper is gone
    assert all(not m._forward_pre_hooks for m in model.compressors.values())
