"""FLOP counting in the paper's convention, and the paper's Table 1 figures."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import make_vit
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import inti_adapters as ia


def _meta(name):
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False), torch.empty(1, 3, 16, 224, 224)


@pytest.fixture(scope="module")
def vit_b():
    return _meta("vit_base_patch16_clip_224")


@pytest.mark.parametrize("layers, paper, tol", [([], 281, 0.01), ([4, 6], 182, 0.04), ([6, 8], 217, 0.04)])
def test_vit_b_table_1(vit_b, layers, paper, tol):
    vit, video = vit_b
    model = ia.inject(vit, layers=layers)
    g = ia.count_gflops(model, video)
    model.unload()
    assert abs(g - paper) / paper <= tol, (layers, g)


def test_vit_l_naive():
    vit, video = _meta("vit_large_patch14_clip_224")
    g = ia.count_gflops(ia.inject(vit, layers=[]), video)
    assert abs(g - 1297) / 1297 <= 0.01, g


def test_plain_timm_model_on_one_image(vit_b):
    vit, _ = vit_b
    g = ia.count_gflops(vit, torch.empty(1, 3, 224, 224, device="meta"))
    assert abs(g - 281 / 16) / (281 / 16) <= 0.01


def test_one_inti_layer_on_vit_b_adds_about_5_3_m_parameters(vit_b):
    vit, _ = vit_b
    model = ia.inject(vit, layers=[4, 6])
    added = sum(p.numel() for p in model.compressors.parameters())
    model.unload()
    assert 10.4e6 < added < 11.0e6, added  # paper: ~10.6 M for two layers


def test_fused_cpu_attention_is_counted():
    """On real CPU tensors SDPA runs fused; the count must equal the math kernel's."""
    vit = make_vit(depth=2)
    image = torch.randn(2, 3, 32, 32)
    fused = ia.count_gflops(vit, image)
    with sdpa_kernel(SDPBackend.MATH):
        math = ia.count_gflops(vit, image)
    assert fused == pytest.approx(math, rel=1e-9)
    with torch.no_grad(), FlopCounterMode(display=False) as plain:  # torch's own counter misses it
        vit(image)
    assert plain.get_total_flops() / 2e9 < fused


def test_counts_scale_with_compression():
    vit = make_vit(depth=4)
    video = torch.randn(1, 3, 8, 32, 32)
    naive = ia.count_gflops(ia.inject(vit, layers=[]), video)
    vit2 = make_vit(depth=4)
    early = ia.inject(vit2, layers=[0], contexts=("token",))
    g_early = ia.count_gflops(early, video)
    assert g_early < naive
    assert early.frame_schedule(8) == [8, 4, 4, 4]
