"""plan(): layer choices under a GFLOPs budget, checked against count_gflops."""

from __future__ import annotations

import pytest
import torch
from conftest import IMG, make_vit

import inti_adapters as ia


@pytest.mark.parametrize("frames", [8, 6, 5])
def test_plan_figures_equal_count_gflops(frames):
    vit = make_vit(depth=6)
    entries = ia.plan(vit, frames, budget=1e9)
    assert len(entries) == 6 + 15  # every choice of one or two layers fits this budget
    video = torch.randn(1, 3, frames, IMG, IMG)
    naive = ia.count_gflops(ia.inject(vit, layers=[]).eval(), video)
    for e in entries[::4] + entries[-1:]:
        model = ia.inject(make_vit(depth=6), layers=list(e.layers))
        assert e.gflops == pytest.approx(ia.count_gflops(model, video), rel=1e-9), e.layers
        assert e.fraction == pytest.approx(e.gflops / naive, rel=1e-9)
        assert list(e.frames) == model.frame_schedule(frames)


def test_plan_budget_filters_and_sorts():
    vit = make_vit(depth=6)
    allowed = ia.plan(vit, 8, fraction=0.6)
    assert allowed and all(e.fraction <= 0.6 for e in allowed)
    assert [e.gflops for e in allowed] == sorted((e.gflops for e in allowed), reverse=True)
    absolute = ia.plan(vit, 8, budget=allowed[0].gflops)
    assert absolute[0].gflops == allowed[0].gflops
    assert len(ia.plan(vit, 8, fraction=0.6, max_layers=1)) < len(allowed)
    assert "layers" in ia.format_plan(allowed)


def test_plan_uses_an_injected_models_options():
    model = ia.inject(make_vit(depth=6), layers=[1, 3], contexts=("token",))
    entries = {e.layers: e.gflops for e in ia.plan(model, 8, budget=1e9)}
    assert entries[(1, 3)] == pytest.approx(ia.count_gflops(model, torch.randn(1, 3, 8, IMG, IMG)), rel=1e-9)
    assert model.frame_schedule(8) == [8, 8, 4, 4, 2, 2]  # planning left the model as it was


@pytest.mark.parametrize("kwargs, match", [(dict(), "exactly one"), (dict(budget=1.0, fraction=0.5), "exactly one"),
                                           (dict(fraction=1.5), r"\(0, 1\]"), (dict(fraction=0.5, max_layers=0), "max_layers")])
def test_plan_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ia.plan(make_vit(), 8, **kwargs)


def test_plan_for_vit_b_middle_setting():
    import timm

    vit = timm.create_model("vit_base_patch16_clip_224", pretrained=False)
    entries = {e.layers: e for e in ia.plan(vit, 16, fraction=0.7)}
    assert entries[(4, 6)].gflops == pytest.approx(179.0, abs=0.1)
    assert (6, 8) not in entries  # the late setting costs 76% of naive
