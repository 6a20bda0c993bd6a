"""Temporal adapters: identity at init, exact placements, current frame counts, hooks safe under
checkpointing and compile, save/load/unload, clear errors, and the paper's parameter counts."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import IMG, make_vit, static_video
from timm.models.vision_transformer import VisionTransformer

import inti_adapters as ia
from inti_adapters.config import InjectConfig
from inti_adapters.context import TokenLayout, VideoContext
from inti_adapters.hosts.timm import TimmHost
from inti_adapters.model import InTIModel
from inti_adapters.serialization import ADAPTER_WEIGHTS_NAME
from inti_adapters.temporal import (
    UNIFORMERV2_B,
    UNIFORMERV2_B_LOCAL,
    UNIFORMERV2_L,
    LocalMHRA,
    LocalMHRAConfig,
    STAdapter,
    STAdapterConfig,
    TemporalShift,
    TemporalShiftConfig,
    list_temporal_adapters,
    register_temporal_adapter,
)

LAYOUT = TokenLayout(num_prefix_tokens=1, cls_index=0, grid=(4, 4))  # 32x32 frames, patch 8
ALL_FRESH = [  # every adapter that starts as the identity, at every placement
    {"name": "local_mhra", "blocks": "all", "placement": "attn"},
    {"name": "st_adapter", "blocks": [1, 2], "placement": "mlp", "kernel_size": (3, 3, 3)},
    {"name": "global_mhra", "blocks": {"last": 2}},
]


def clip(b=2, t=8, seed=0, size=IMG):
    return torch.randn(b, 3, t, size, size, generator=torch.Generator().manual_seed(seed))


def perturb(module, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def hooks_on(module) -> int:
    """Forward (pre-)hooks and per-instance forward overrides anywhere in ``module``."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + ("forward" in m.__dict__) for m in module.modules())


# -- registry and spec errors ----------------------------------------------------------------------
def test_registry_has_the_builtin_adapters_and_refuses_duplicates():
    assert {"local_mhra", "st_adapter", "temporal_shift", "global_mhra"} <= set(list_temporal_adapters())
    with pytest.raises(ValueError, match="already registered"):
        register_temporal_adapter("local_mhra")(LocalMHRA)
    with pytest.raises(ValueError, match="without '.'"):
        register_temporal_adapter("a.b")(LocalMHRA)
    with pytest.raises(TypeError, match="TemporalAdapter"):
        register_temporal_adapter("not_an_adapter")(torch.nn.Linear)


@pytest.mark.parametrize(
    "spec, err, match",
    [
        ({"name": "nope"}, ValueError, r"unknown temporal adapter 'nope'.*global_mhra.*local_mhra"),
        ({"name": "local_mhra", "blocks": [2, 4]}, ValueError, r"out of range.*4 blocks.*0\.\.3.*\[4\]"),
        ({"name": "local_mhra", "blocks": [-1]}, ValueError, r"out of range"),
        ({"name": "local_mhra", "blocks": [1, 1]}, ValueError, "duplicates"),
        ({"name": "local_mhra", "blocks": {"last": 5}}, ValueError, r"1 <= k <= 4"),
        ({"name": "local_mhra", "blocks": {"first": 2}}, ValueError, r"\{'last': k\}"),
        ({"name": "local_mhra", "blocks": 3}, TypeError, "list of block indices"),
        ({"name": "local_mhra", "blocks": []}, ValueError, "empty"),
        ({"name": "local_mhra", "placement": "ffn"}, ValueError, r"placement must be one of \['attn', 'mlp'\]"),
        ({"name": "global_mhra", "placement": "attn"}, ValueError, "takes no placement"),
        ({"name": "local_mhra", "ratio": 2}, TypeError, r"unknown option\(s\) \['ratio'\].*reduction"),
        ({"name": "local_mhra", "kernel_size": 4}, ValueError, "odd"),
        ({"name": "st_adapter", "kernel_size": (3, 3)}, ValueError, "three odd"),
        ({"name": "temporal_shift", "fraction": 1.5}, ValueError, r"\[0, 1\]"),
        ({"name": "global_mhra", "num_heads": 0}, ValueError, "num_heads"),
        ({"name": "global_mhra", "num_heads": 5}, ValueError, "not divisible"),
    ],
)
def test_bad_specs_give_clear_errors(spec, err, match):
    vit = make_vit()
    with pytest.raises(err, match=match):
        ia.inject(vit, temporal=[spec])
    assert hooks_on(vit) == 0  # nothing left behind: the backbone can be injected again
    assert ia.inject(vit, temporal=[{"name": "local_mhra"}]).temporal


def test_the_same_adapter_twice_on_a_block_is_refused():
    with pytest.raises(ValueError, match="configured twice"):
        ia.inject(make_vit(), temporal=[{"name": "local_mhra", "blocks": [1]}, {"name": "local_mhra", "blocks": [0, 1]}])


# -- the adapters on their own ---------------------------------------------------------------------
@pytest.mark.parametrize("adapter", [LocalMHRA(32, LocalMHRAConfig(norm="batch")), LocalMHRA(32, LocalMHRAConfig()),
                                     STAdapter(32, STAdapterConfig()), STAdapter(32, STAdapterConfig(kernel_size=3))])
def test_fresh_conv_adapters_are_the_identity(adapter):
    x = torch.randn(2, 5, 17, 32)
    assert torch.equal(adapter.train()(x, LAYOUT), x)
    assert torch.equal(adapter(x, LAYOUT, return_residual=True), torch.zeros_like(x))


@pytest.mark.parametrize("kernel", [(3, 1, 1), (3, 3, 3), (5, 1, 1)])
def test_conv_adapter_mixes_only_its_kernel_neighbourhood_of_patch_tokens(kernel):
    torch.manual_seed(0)
    adapter = STAdapter(16, STAdapterConfig(kernel_size=kernel)).eval()
    perturb(adapter)
    x = torch.randn(1, 7, 17, 16)
    x2 = x.clone()
    t0, pos = 3, 1 + 5  # patch (1, 1) of the 4x4 grid at frame 3
    x2[:, t0, pos] += 1.0
    changed = (adapter(x2, LAYOUT) - adapter(x, LAYOUT) - (x2 - x)).abs().sum(-1)[0] > 1e-6  # (T, N)
    kt, kh, kw = kernel
    expect = torch.zeros(7, 17, dtype=torch.bool)
    for t in range(t0 - kt // 2, t0 + kt // 2 + 1):
        for r in range(1 - kh // 2, 1 + kh // 2 + 1):
            for c in range(1 - kw // 2, 1 + kw // 2 + 1):
                expect[t, 1 + 4 * r + c] = True
    assert torch.equal(changed, expect)
    y = adapter(x, LAYOUT)
    assert torch.equal(y[:, :, :1], x[:, :, :1])  # the class token passes unchanged


def test_temporal_shift_moves_channels_by_one_frame():
    shift = TemporalShift(16, TemporalShiftConfig(fraction=0.25))  # 2 channels back, 2 forward
    assert sum(p.numel() for p in shift.parameters()) == 0
    x = torch.randn(2, 4, 17, 16)
    y = shift(x, LAYOUT)
    assert torch.equal(y[:, :, :1], x[:, :, :1])
    p = x[:, :, 1:]
    yp = y[:, :, 1:]
    assert torch.equal(yp[:, 1:, :, 0:2], p[:, :-1, :, 0:2]) and not yp[:, 0, :, 0:2].any()
    assert torch.equal(yp[:, :-1, :, 2:4], p[:, 1:, :, 2:4]) and not yp[:, -1, :, 2:4].any()
    assert torch.equal(yp[..., 4:], p[..., 4:])
    assert torch.equal(shift(x, LAYOUT, return_residual=True), y - x)
    assert torch.equal(TemporalShift(16, TemporalShiftConfig(fraction=0))(x, LAYOUT), x)


# -- wiring: placements, frame counts --------------------------------------------------------------
def _by_hand(model, vit, video, adapters=None):
    """forward_features computed block by block, with the adapters (block -> placement -> module)
    applied explicitly."""
    b, _, t = video.shape[:3]
    frames = video.transpose(1, 2).flatten(0, 1)
    with model.disable_adapters():
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(frames))))
        n, c = x.shape[1:]

        def run(adapter, z, residual=False):
            out = adapter(z.reshape(b, t, n, c), LAYOUT, return_residual=residual).reshape(-1, n, c)
            return out

        for i, blk in enumerate(vit.blocks):
            here = adapters[str(i)] if adapters is not None and str(i) in adapters else {}
            if "attn" in here:
                x = run(here["attn"], x)
            if "mlp" in here:
                x_mid = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
                x_mid = x_mid + run(here["mlp"], x_mid, residual=True)
                x = x_mid + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x_mid))))
            else:
                x = blk(x)
        return vit.norm(x).unflatten(0, (b, t))


@pytest.mark.parametrize("name", ["local_mhra", "st_adapter", "temporal_shift"])
def test_placements_equal_the_computation_by_hand(name):
    vit = make_vit(init_values=0.5)  # layer scale: ls1 is a real module on the attention branch
    # the 'mlp' spec comes first: on one block the 'attn' adapters still run first
    model = ia.inject(vit, temporal=[{"name": name, "blocks": [1, 2], "placement": "mlp"},
                                     {"name": name, "blocks": [0, 2], "placement": "attn"}])
    perturb(model.temporal)
    video = clip(t=5)
    with torch.no_grad():
        got = model.forward_features(video)
        want = _by_hand(model, vit, video, model.temporal[name])
        without = _by_hand(model, vit, video)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - without).abs().max() > 1e-2  # the adapters do change the features


def _open_clip_tower(seq_first: bool):
    open_clip = pytest.importorskip("open_clip")
    if "open_clip" not in ia.list_hosts():
        pytest.skip("no OpenCLIP host registered")
    torch.manual_seed(0)
    visual = open_clip.transformer.VisionTransformer(image_size=IMG, patch_size=8, width=32, layers=3, heads=2,
                                                     mlp_ratio=2.0, output_dim=16, ls_init_value=0.5)
    if seq_first:
        tr = visual.transformer
        seq = open_clip.transformer.Transformer(32, 3, 2, mlp_ratio=2.0, ls_init_value=0.5, batch_first=False)
        seq.load_state_dict(tr.state_dict())
        visual.transformer = seq
    return visual.eval()


@pytest.mark.parametrize("seq_first", [False, True], ids=["batch_first", "seq_first"])
def test_mlp_placement_on_open_clip_blocks(seq_first):
    visual = _open_clip_tower(seq_first)
    model = ia.inject(visual, temporal=[{"name": "local_mhra", "blocks": [1], "placement": "mlp"}])
    perturb(model.temporal)
    adapter = model.temporal["local_mhra"]["1"]["mlp"]
    blk = visual.transformer.resblocks[1]
    b, t = 2, 3
    x = torch.randn(b * t, 17, 32)
    xs = x.transpose(0, 1) if seq_first else x  # the block's own layout
    ctx = VideoContext(batch_size=b, num_frames=t, tokens=LAYOUT)
    with torch.no_grad():
        with model._holder.forward(ctx):
            got = blk(xs)
        with model.disable_adapters():
            x_mid = xs + blk.ls_1(blk.attention(blk.ln_1(xs)))
            bnc = x_mid.transpose(0, 1) if seq_first else x_mid
            bnc = bnc + adapter(bnc.reshape(b, t, 17, 32), LAYOUT, return_residual=True).reshape(b * t, 17, 32)
            x_mid = bnc.transpose(0, 1) if seq_first else bnc
            want = x_mid + blk.ls_2(blk.mlp(blk.ln_2(x_mid)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frames", [8, 6])
def test_every_adapter_sees_the_current_frame_count(frames):
    vit = make_vit(depth=8)
    model = ia.inject(vit, layers=[1, 3], temporal=[
        {"name": "local_mhra", "blocks": "all", "placement": "attn"},
        {"name": "st_adapter", "blocks": "all", "placement": "mlp"},
        {"name": "temporal_shift", "blocks": [0, 3, 7]},
        {"name": "global_mhra", "blocks": [1, 3, 6, 7], "dpe": True},  # 1 and 3 also hold InTI layers
    ])
    seen: dict[tuple[str, int], list[int]] = {}

    def record(key, frames_of):
        return lambda m, args: seen.setdefault(key, []).append(frames_of(args))

    for name in ("local_mhra", "st_adapter", "temporal_shift"):
        for i, by_place in model.temporal[name].items():
            for adapter in by_place.values():
                adapter.register_forward_pre_hook(record((name, int(i)), lambda a: a[0].shape[1]))
    for i, layer in model.temporal["global_mhra"].layers.items():
        layer.register_forward_pre_hook(record(("global_mhra", int(i)), lambda a: a[1].shape[1] // 17))
    with torch.no_grad():
        model(clip(t=frames))
    schedule = model.frame_schedule(frames)
    assert schedule[:4] == [frames, frames, frames // 2, frames // 2]
    assert {k: v for k, v in seen.items() if k[0] == "local_mhra"} == {("local_mhra", i): [schedule[i]] for i in range(8)}
    assert {k: v for k, v in seen.items() if k[0] == "st_adapter"} == {("st_adapter", i): [schedule[i]] for i in range(8)}
    assert [seen[("temporal_shift", i)] for i in (0, 3, 7)] == [[schedule[i]] for i in (0, 3, 7)]
    # the global module reads each block's output before that block's InTI layer
    assert [seen[("global_mhra", i)] for i in (1, 3, 6, 7)] == [[schedule[i]] for i in (1, 3, 6, 7)]


# -- invariants --------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["cls", "registers", "no_cls_avg", "distilled", "map", "eva", "beit", "open_clip"])
def test_static_video_with_fresh_adapters_equals_the_image_model(variant):
    if variant == "open_clip":
        backbone = _open_clip_tower(seq_first=False)
        specs = ALL_FRESH[:1] + [{**ALL_FRESH[1], "blocks": [1]}, ALL_FRESH[2]]
    else:
        backbone = make_vit(variant)
        specs = ALL_FRESH
    _, frame = static_video()
    with torch.no_grad():
        image = backbone(frame)
    model = ia.inject(backbone, layers=[0, 2], temporal=specs).eval()
    video, _ = static_video(frames=6)
    with torch.no_grad():
        out = model(video)
    torch.testing.assert_close(out, image, rtol=0, atol=1e-5)
    if variant in ("distilled", "open_clip"):  # num_features != embed_dim: a projection C -> D
        assert isinstance(model.temporal["global_mhra"].proj, torch.nn.Linear)


def test_temporal_shift_is_the_exception_to_the_static_invariant():
    vit = make_vit()
    video, frame = static_video(frames=4)
    with torch.no_grad():
        image = vit(frame)
        out = ia.inject(vit, temporal=[{"name": "temporal_shift", "blocks": [1]}])(video)
    assert (out - image).abs().max() > 1e-4


def test_trained_adapters_change_the_output_and_all_receive_gradients():
    vit = make_vit(depth=4)
    model = ia.inject(vit, layers=[1], temporal=ALL_FRESH, freeze_backbone=True)
    perturb(model.temporal)
    assert all(p.requires_grad for p in model.temporal.parameters())
    model(clip(t=6)).square().mean().backward()
    for n, p in model.temporal.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_fresh_global_module_learns_from_its_gate():
    model = ia.inject(make_vit(), temporal=[{"name": "global_mhra", "blocks": {"last": 2}}])
    model(clip(t=4)).square().mean().backward()
    assert model.temporal["global_mhra"].gate.grad.abs().sum() > 0  # the zero gate gets a gradient


def test_forward_head_uses_the_tokens_of_its_own_forward_once():
    model = ia.inject(make_vit(), temporal=[{"name": "global_mhra", "blocks": {"last": 2}}]).eval()
    perturb(model.temporal)
    video = clip(t=4)
    with torch.no_grad():
        tokens = model.forward_features(video)
        torch.testing.assert_close(model.forward_head(tokens), model(video), rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="forward_head must follow forward_features"):
            model.forward_head(tokens)


def test_adapters_follow_the_backbone_dtype():
    vit = make_vit().to(torch.bfloat16)
    model = ia.inject(vit, layers=[1], temporal=ALL_FRESH)
    assert {p.dtype for p in model.temporal.parameters()} == {torch.bfloat16}
    assert model(clip(t=4).to(torch.bfloat16)).dtype == torch.bfloat16


# -- errors at install and at run time ---------------------------------------------------------------
class _NeverGridHost(TimmHost):
    grid_size = ia.Host.grid_size  # this host never knows a spatial grid


class _NoGridNowHost(TimmHost):
    def grid_size(self, height, width):
        return None


def test_adapters_needing_the_grid_are_refused_on_a_host_without_one():
    vit = make_vit()
    with pytest.raises(ValueError, match="needs the spatial patch grid"):
        InTIModel(vit, InjectConfig(temporal=({"name": "st_adapter", "kernel_size": [3, 3, 3]},)), _NeverGridHost(vit))
    model = InTIModel(vit, InjectConfig(temporal=({"name": "global_mhra", "blocks": [3]},)), _NoGridNowHost(vit))
    with pytest.raises(ValueError, match="needs the patch grid.*Pass dpe=False"):
        model(clip(t=2))


def test_temporal_only_adapters_work_without_a_grid():
    vit = make_vit()
    spec = {"name": "local_mhra", "blocks": [1, 2]}
    model = InTIModel(vit, InjectConfig(temporal=(spec, {"name": "global_mhra", "dpe": False})), _NoGridNowHost(vit))
    ref = ia.inject(make_vit(), temporal=[spec, {"name": "global_mhra", "dpe": False}])
    perturb(model.temporal)
    ref.temporal.load_state_dict(model.temporal.state_dict())
    video = clip(t=4)
    with torch.no_grad():
        torch.testing.assert_close(model(video), ref(video))


def test_adapters_after_token_merging_are_refused_clearly():
    model = ia.inject(make_vit(), layers=[1], compressor="tome", temporal=[{"name": "local_mhra", "blocks": [2]}])
    with pytest.raises(ValueError, match="tokens were merged or dropped before this block"):
        model(clip(t=2))


class _PlainBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)

    def forward(self, x):
        return x + self.fc(x)


class _PlainBlocksHost(TimmHost):
    @property
    def blocks(self):
        return self._blocks


def test_mlp_placement_on_an_unknown_block_names_what_is_missing():
    vit = make_vit()
    host = _PlainBlocksHost(vit)
    host._blocks = torch.nn.ModuleList([_PlainBlock() for _ in range(4)])
    with pytest.raises(ValueError, match=r"_PlainBlock has none of \['drop_path1', 'ls_1'\].*placement='attn'"):
        InTIModel(vit, InjectConfig(temporal=({"name": "local_mhra", "placement": "mlp"},)), host)
    assert all(not b._forward_pre_hooks for b in host._blocks)  # the hooks installed so far were removed


# -- training machinery -------------------------------------------------------------------------------
def _loss_and_grads(model, video):
    model.zero_grad()
    loss = model(video).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_identical_loss_and_grads():
    model = ia.inject(make_vit(depth=4), layers=[1], temporal=[
        *ALL_FRESH, {"name": "temporal_shift", "blocks": [3], "placement": "mlp"}]).train()
    perturb(model.temporal)
    video = clip(t=6)
    calls = []
    for place in (model.temporal["local_mhra"]["2"]["attn"], model.temporal["st_adapter"]["2"]["mlp"]):
        place.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[1]))
    loss, grads = _loss_and_grads(model, video)
    assert calls == [3, 3]  # block 2 comes after the InTI layer on block 1: 6 -> 3 frames
    model.set_grad_checkpointing(True)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, video)
    assert calls == [3, 3] * 3  # forward, then the recompute during backward
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads.keys() and any(n.startswith("temporal.") for n in grads)
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_reentrant_checkpointing_is_refused_for_the_global_module():
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

    model = ia.inject(make_vit(), temporal=[{"name": "global_mhra", "blocks": [3]}]).train()
    model.set_grad_checkpointing(True)
    prev = use_reentrant_ckpt()
    set_reentrant_ckpt(True)
    try:
        with pytest.raises(RuntimeError, match="re-entrant"):
            model(clip(t=2))
    finally:
        set_reentrant_ckpt(prev)


def _compile_model(depth=3, layers=(1,), specs=ALL_FRESH):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=IMG, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=5).eval()
    model = ia.inject(vit, layers=layers, temporal=specs).eval()
    perturb(model.temporal)
    return vit, model


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_autocast"])
def test_compiled_model_equals_eager(backend, dtype):
    """Dynamo traces every adapter hook (aot_eager: fast); inductor takes ~40 s per dtype on 2 CPU cores."""
    _, model = _compile_model()
    video = clip(t=4)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=0.05)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        eager = model(video)
        compiled = torch.compile(model, backend=backend)(video)
    assert compiled.dtype == eager.dtype == dtype
    torch.testing.assert_close(compiled.float(), eager.float(), **tol)


@pytest.mark.parametrize("how", ["graph_break", "per_block"])
def test_compile_keeps_the_mlp_placement_of_every_block(how):
    # a compiled block must not be reused for another block with different adapters (dynamo
    # does not guard on submodule hooks), also when the model is compiled in pieces
    vit, model = _compile_model(depth=4, layers=(), specs=[{"name": "st_adapter", "blocks": [1, 2], "placement": "mlp"}])
    video = clip(t=4)
    with torch.no_grad():
        eager = model(video)
        if how == "graph_break":
            vit.blocks[3].register_forward_hook(lambda m, a, o: torch._dynamo.graph_break())
            out = torch.compile(model, backend="eager")(video)
        else:
            for blk in vit.blocks:
                blk.compile(backend="eager")
            out = model(video)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_stays_close_to_fp32():
    _, model = _compile_model()
    video = clip(t=4)
    with torch.no_grad():
        ref = model(video)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(video)
    assert out.dtype == torch.bfloat16 and out.isfinite().all()
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.1)
    assert (out - ref).abs().max() > 0  # autocast did run in bfloat16


# -- save / load / unload -----------------------------------------------------------------------------
def test_save_and_load_round_trip_includes_the_adapters(tmp_path):
    specs = [*ALL_FRESH, {"name": "temporal_shift", "blocks": [0], "fraction": 0.5}]
    model = ia.inject(make_vit(seed=3), layers=[1], temporal=specs, freeze_backbone=True)
    perturb(model.temporal)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / ADAPTER_WEIGHTS_NAME))
    temporal_keys = {k for k in model.state_dict() if k.startswith("temporal.")}
    assert temporal_keys and temporal_keys <= set(saved)
    assert "temporal.local_mhra.3.attn.up.weight" in saved and "temporal.global_mhra.gate" in saved
    loaded = ia.load_pretrained(make_vit(seed=3), tmp_path)
    video = clip(t=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(video), model(video), rtol=0, atol=0)


def test_unload_removes_every_adapter_hook():
    vit = make_vit()
    frame = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        before = vit(frame)
    assert hooks_on(vit) == 0
    model = ia.inject(vit, layers=[1], temporal=[*ALL_FRESH, {"name": "temporal_shift", "placement": "mlp"}])
    perturb(model.temporal)
    assert any("forward" in b.drop_path1.__dict__ for b in vit.blocks)  # the 'mlp' placements
    backbone = model.unload()
    assert hooks_on(backbone) == 0 and len(model.temporal) == 0
    with torch.no_grad():
        assert torch.equal(backbone(frame), before)


# -- the paper's configuration --------------------------------------------------------------------------
def _count(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def test_uniformerv2_presets_give_the_papers_parameters_and_gflops():
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=400)
        video = torch.empty(1, 3, 16, 224, 224)
    model = ia.inject(vit, temporal=UNIFORMERV2_B)
    assert model.temporal["global_mhra"].query.is_meta
    assert abs(_count(model) - 115) < 2  # UniFormerV2-B/16: 115 M
    assert abs(ia.count_gflops(model, video) - 297) < 3  # UniFormerV2-B/16, 16 frames: 297 GFLOPs
    uv2 = _count(model)
    model.unload()
    model = ia.inject(vit, layers=[4, 6], temporal=UNIFORMERV2_B)
    assert abs(_count(model) - 126) < 1.5  # InTI-B with the temporal modules (paper Table 2): 126 M
    assert abs((_count(model) - uv2) / 2 - 5.38) < 0.01  # each InTI layer adds ~5.38 M
    assert abs(ia.count_gflops(model, video) - 184) < 3  # ... and 184 GFLOPs
    model.unload()
    model = ia.inject(vit, temporal=UNIFORMERV2_B_LOCAL)  # + local MHRA before attention and MLP of every block
    local = sum(p.numel() for p in model.temporal["local_mhra"].parameters())
    # 24 modules: LayerNorm(768), Linear(768 -> 512), depth-wise Conv3d(512, (3, 1, 1)), Linear(512 -> 768)
    assert local == 24 * (2 * 768 + 768 * 512 + 512 + 512 * 3 + 512 + 512 * 768 + 768)
    assert abs(_count(model) - uv2 - local / 1e6) < 1e-9
    with torch.device("meta"):
        vit_l = timm.create_model("vit_large_patch14_clip_224", pretrained=False, num_classes=400)
    assert abs(_count(ia.inject(vit_l, temporal=UNIFORMERV2_L)) - 354) < 2  # UniFormerV2-L/14: 354 M
