"""The surgery layer: one mechanism, exact removal, compile-safety per extension kind, the public
extension contract used from outside the package, and the peft composition trap."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from conftest import make_vit
from torch import nn

import inti_adapters as ia
from inti_adapters.config import Config
from inti_adapters.surgery import probe

# one entry per extension kind: (layers, inject options)
KINDS = {
    "inti": ([1], {}),
    "linear_pool": ([1], {"compressor": "linear_pool"}),
    "conv_pool": ([1], {"compressor": "conv_pool", "kernel_size": 3}),
    "tome": ([0, 2], {"compressor": "tome", "r": 3}),
    "local_mhra": ([], {"temporal": [{"name": "local_mhra", "blocks": [1, 2], "placement": "attn"}]}),
    "st_adapter": ([], {"temporal": [{"name": "st_adapter", "blocks": [1, 2], "placement": "mlp",
                                      "kernel_size": (3, 3, 3)}]}),
    "temporal_shift": ([], {"temporal": [{"name": "temporal_shift", "blocks": [2]}]}),
    "global_mhra": ([1], {"temporal": [{"name": "global_mhra", "blocks": [2, 3], "num_heads": 2}]}),
}


def _perturbed(model: nn.Module, seed: int = 3) -> nn.Module:
    """Non-trivial added weights, so a skipped site changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(model.compressors.parameters()) + list(model.temporal.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("kind", list(KINDS))
def test_compiled_model_equals_eager_for_every_extension_kind(kind):
    layers, options = KINDS[kind]
    vit = make_vit(img_size=48)  # 6x6 grid: room for tome's r
    model = _perturbed(ia.inject(vit, layers=layers, **options)).eval()
    video = torch.randn(2, 3, 4, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(video)
        with model.disable_adapters():
            naive = model(video)  # every site passes through: what a skipped site would give
        compiled = torch.compile(model, backend="aot_eager")(video)
    assert not torch.allclose(eager, naive, atol=1e-4), "the extension must change the output for this test"
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_unload_restores_every_module_exactly():
    vit = make_vit()
    before = {n: m.__dict__.get("forward") for n, m in vit.named_modules()}
    model = ia.inject(vit, layers=[0, 2], compressor="tome", r=2, temporal=[
        {"name": "st_adapter", "blocks": "all", "placement": "mlp"},
        {"name": "local_mhra", "blocks": [1], "placement": "attn"}])
    patched = [n for n, m in vit.named_modules() if "forward" in m.__dict__]
    assert {"blocks.0", "blocks.0.attn.qkv", "blocks.1.drop_path1", "blocks.3.attn"} <= set(patched)
    model.unload()
    assert {n: m.__dict__.get("forward") for n, m in vit.named_modules()} == before


def test_probe_is_temporary_and_can_change_outputs():
    vit = make_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = vit(x)
        seen = []
        with probe(vit.blocks[:2], before=lambda m, a, k: seen.append(a[0].shape),
                   after=lambda m, out: out * 0):
            zeroed = vit(x)
        again = vit(x)
    assert len(seen) == 2 and not torch.equal(zeroed, ref)
    assert torch.equal(again, ref) and all("forward" not in m.__dict__ for m in vit.modules())


# -- a compressor written outside the package, against the documented contract ------------------
@dataclasses.dataclass
class KeepFirstConfig(Config):
    scale: float = 1.0


class KeepFirst(ia.Compressor):
    """Keeps the first frame of every pair (scaled), counts its calls in the per-forward store."""

    config_class = KeepFirstConfig

    def output_frames(self, num_frames: int) -> int:
        return (num_frames + 1) // 2

    def attach(self, site, block_index):
        super().attach(site, block_index)
        store = site.store("test.keep_first")
        site.observe_block_output(site.depth - 1, lambda tokens, ctx: store.update(last=tokens.shape))
        self._store = store

    def forward(self, x, layout):
        return x[:, 0::2] * self.config.scale


@pytest.fixture
def keep_first():
    ia.register_compressor("test_keep_first")(KeepFirst)
    yield
    from inti_adapters.compressors._base import _COMPRESSORS

    del _COMPRESSORS["test_keep_first"]


def test_a_compressor_from_outside_the_package_works_through_the_contract(keep_first):
    vit = make_vit()
    model = ia.inject(vit, layers=[1], compressor="test_keep_first", scale=1.0).eval()
    video = torch.randn(2, 3, 6, 32, 32)
    assert model.frame_schedule(6) == [6, 6, 3, 3]
    with torch.no_grad():
        out = model(video)
        with model.disable_adapters():  # reference: the first frame of each pair after blocks[1]
            frames = video.transpose(1, 2).flatten(0, 1)
            x = vit.norm_pre(vit._pos_embed(vit.patch_embed(frames)))
            x = vit.blocks[1](vit.blocks[0](x)).unflatten(0, (2, 6))[:, 0::2].flatten(0, 1)
            x = vit.norm(vit.blocks[3](vit.blocks[2](x)))
            want = vit.head(vit.forward_head(x, pre_logits=True).unflatten(0, (2, 3)).mean(1))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert model.compressors["1"]._store["last"] == (2, 3, 17, 32)
    model.unload()
    assert all("forward" not in m.__dict__ for m in vit.modules())
    plans = ia.plan(vit, num_frames=8, fraction=1.0, max_layers=1, compressor="test_keep_first")
    assert plans[-1].layers == (0,) and plans[-1].frames == (8, 4, 4, 4)  # via its output_frames


# -- peft: plain get_peft_model after inject ---------------------------------------------------
def test_plain_get_peft_model_after_inject_warns_with_the_fix():
    peft = pytest.importorskip("peft")
    model = ia.inject(make_vit(), layers=[1])
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["qkv"]))
    assert not any(p.requires_grad for p in model.compressors.parameters())  # what peft does
    wrapped.train()
    with pytest.warns(UserWarning, match=r"(?s)frozen while peft adapters train.*add_lora"):
        wrapped(torch.randn(1, 3, 2, 32, 32)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped(torch.randn(1, 3, 2, 32, 32))  # said once


@pytest.mark.parametrize("how", ["add_lora", "on_purpose"])
def test_no_warning_when_the_layers_train_or_are_frozen_on_purpose(how):
    peft = pytest.importorskip("peft")
    model = ia.inject(make_vit(), layers=[1])
    config = peft.LoraConfig(r=2, target_modules=["qkv"])
    if how == "add_lora":
        wrapped = ia.add_lora(model, config)
        assert all(p.requires_grad for p in model.compressors.parameters())
    else:
        wrapped = peft.get_peft_model(model, config)
        model.freeze_added_modules()
    wrapped.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped(torch.randn(1, 3, 2, 32, 32)).sum().backward()


def test_deepcopy_gives_an_independent_working_model():
    """copy.deepcopy (EMA, model averaging) copies the backbone without the sites and injects it again."""
    import copy

    vit = make_vit(img_size=48)
    model = _perturbed(ia.inject(vit, layers=[0, 2], compressor="tome", r=3, freeze_backbone=True,
                                 temporal=[{"name": "st_adapter", "blocks": [0], "placement": "mlp"}])).eval()
    video = torch.randn(2, 3, 4, 48, 48)
    with torch.no_grad():
        ref = model(video)
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(video), ref, rtol=0, atol=0)
        assert [p.requires_grad for p in twin.parameters()] == [p.requires_grad for p in model.parameters()]
        for p in twin.compressors.parameters():
            p.add_(1.0)
        for p in twin.temporal.parameters():
            p.add_(0.1)
        assert not torch.allclose(twin(video), ref)
        torch.testing.assert_close(model(video), ref, rtol=0, atol=0)  # the original is untouched
    assert twin.unload() is not vit and all("forward" not in m.__dict__ for m in twin.backbone.modules())
    assert "forward" in vit.blocks[0].__dict__  # the original keeps its sites


def test_inject_and_load_never_change_the_callers_config(tmp_path):
    """The model keeps a validated copy; the caller's InjectConfig (and its option dict) stay as given."""
    from inti_adapters.model import build_video_model

    options = {"fusion": "add"}
    config = ia.InjectConfig(layers=(1,), compressor_config=options, temporal="uniformerv2_b")
    before = config.to_dict()
    model = build_video_model(make_vit(embed_dim=48, num_heads=2), config)
    assert config.to_dict() == before and options == {"fusion": "add"}
    assert model.config.compressor_config["fusion"] == "add" and len(model.config.compressor_config) > 1
    assert isinstance(model.config.temporal, tuple) and model.config.temporal[0]["name"] == "global_mhra"
    with pytest.raises(ValueError, match="already has inti_adapters hooks"):
        build_video_model(model.backbone, config)  # the same guards as inject
