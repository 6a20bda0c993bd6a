"""The comparison compressors of paper Table 2: linear_pool, conv_pool and tome (token merging)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import IMG, make_vit, static_video
from timm.models.vision_transformer import Attention

import inti_adapters as ia
from inti_adapters.compressors import _base, build_compressor
from inti_adapters.compressors.conv_pool import ConvPool, ConvPoolConfig
from inti_adapters.compressors.linear_pool import LinearPool
from inti_adapters.compressors.tome import (
    TokenMerging,
    ToMeConfig,
    max_merge,
    merge_frames,
    size_bias,
)
from inti_adapters.hosts.timm import TimmHost
from inti_adapters.planning import r_for_budget
from inti_adapters.surgery import probe

# conftest's tiny ViT: width 32, 2 heads, 4 blocks, 4x4 patch grid + class token = 17 tokens
C, N, P, GRID = 32, 17, 1, (4, 4)
LAYOUT = ia.TokenLayout(num_prefix_tokens=P, cls_index=0, grid=GRID)


def _video(batch: int = 2, frames: int = 4, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, frames, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def test_registry_names_and_unknown_name_error():
    assert {"inti", "linear_pool", "conv_pool", "tome"} <= set(ia.list_compressors())
    with pytest.raises(ValueError, match="unknown compressor 'nope'") as err:
        ia.inject(make_vit(), layers=[1], compressor="nope")
    for name in ("inti", "linear_pool", "conv_pool", "tome"):
        assert name in str(err.value)


# -- temporal pooling: linear_pool and conv_pool -------------------------------------------------
@pytest.mark.parametrize("frames", [4, 5])
@pytest.mark.parametrize(
    "name,options", [("linear_pool", {}), ("conv_pool", {}), ("conv_pool", {"kernel_size": 3})]
)
def test_fresh_pooling_is_pairwise_average(name, options, frames):
    torch.manual_seed(0)
    layer = build_compressor(name, C, options)
    x = torch.randn(2, frames, N, C)
    y = layer(x, LAYOUT)
    b = x[:, 1::2] if frames % 2 == 0 else torch.cat([x[:, 1::2], x[:, -1:]], dim=1)
    expected = (x[:, 0::2] + b) / 2
    assert layer.output_frames(frames) == y.shape[1] == (frames + 1) // 2
    if name == "linear_pool":
        assert torch.equal(y, expected)
    else:
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    if frames % 2:  # the repeated last frame passes through unchanged
        torch.testing.assert_close(y[:, -1], x[:, -1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("frames", [4, 5])
@pytest.mark.parametrize("name", ["linear_pool", "conv_pool"])
def test_static_video_equals_image_model(name, frames):
    vit = make_vit()
    video, frame = static_video(frames=frames)
    with torch.no_grad():
        ref = vit(frame)
        out = ia.inject(vit, layers=[0, 2], compressor=name)(video)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_linear_pool_weights_sum_to_one_and_train():
    torch.manual_seed(0)
    model = ia.inject(make_vit(), layers=[0, 2], compressor="linear_pool")
    pools = [model.compressors["0"], model.compressors["2"]]
    assert all(isinstance(p, LinearPool) for p in pools)
    assert sum(p.numel() for p in model.compressors.parameters()) == 4  # one logit pair per layer
    opt = torch.optim.SGD(model.compressors.parameters(), lr=10.0)
    loss = model(_video()).logsumexp(-1).sum()
    loss.backward()
    for p in model.compressors.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    opt.step()
    for pool in pools:
        w = pool.weights()
        torch.testing.assert_close(w.sum(), torch.tensor(1.0), rtol=0, atol=1e-6)
        assert not torch.allclose(w, torch.full((2,), 0.5))  # moved away from plain averaging


def test_conv_pool_trains_and_counts_its_parameters():
    model = ia.inject(make_vit(), layers=[1], compressor="conv_pool", kernel_size=3)
    conv = model.compressors["1"]
    assert sum(p.numel() for p in conv.parameters()) == 2 * 3 * 3 * C * C + C
    model(_video()).logsumexp(-1).sum().backward()
    for name, p in conv.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_conv_pool_prefix_tokens_use_centre_taps():
    torch.manual_seed(0)
    pool = ConvPool(C, ConvPoolConfig(kernel_size=3))
    with torch.no_grad():
        for p in pool.parameters():
            p.normal_()
    x = torch.randn(1, 4, N, C)
    y = pool(x, LAYOUT)
    w, bias = pool.conv.weight, pool.conv.bias
    expected = x[:, 0::2, 0] @ w[:, :, 0, 1, 1].T + x[:, 1::2, 0] @ w[:, :, 1, 1, 1].T + bias
    torch.testing.assert_close(y[:, :, 0], expected, rtol=1e-5, atol=1e-5)
    # a prefix token behaves like a 1x1 zero-padded image through the same convolution
    lone = x[:, :, :1].permute(0, 3, 1, 2)[..., None]  # (B, C, T, 1, 1)
    torch.testing.assert_close(pool.conv(lone)[..., 0, 0].permute(0, 2, 1), expected, rtol=1e-5, atol=1e-5)


def test_conv_pool_refuses_tokens_and_hosts_without_grid():
    pool = ConvPool(C)
    x = torch.randn(1, 2, N, C)
    with pytest.raises(ValueError, match="needs the patch grid"):
        pool(x, ia.TokenLayout(1, 0, None))
    with pytest.raises(ValueError, match="merged or dropped"):
        pool(x[:, :, :-3], LAYOUT)  # merged tokens: 14 do not match 1 + 4x4

    @ia.register_host("test_compressors_gridless")
    class Gridless(TimmHost):
        @classmethod
        def matches(cls, model):
            return False

        def grid_size(self, height, width):
            return None

    try:
        model = ia.inject(make_vit(), layers=[1], compressor="conv_pool", host="test_compressors_gridless")
        with pytest.raises(ValueError, match="needs the patch grid"):
            model(_video())
    finally:
        ia.hosts._base._HOSTS.pop("test_compressors_gridless")


def test_pooling_config_validation():
    for bad in (2, 0, -1, 1.0, True):
        with pytest.raises(ValueError, match="kernel_size must be a positive odd int"):
            ConvPoolConfig(kernel_size=bad)
    with pytest.raises(ValueError, match="odd_frames"):
        ia.inject(make_vit(), layers=[1], compressor="linear_pool", odd_frames="drop")
    with pytest.raises(TypeError, match="unknown option"):
        ia.inject(make_vit(), layers=[1], compressor="linear_pool", kernel_size=3)
    with pytest.raises(ValueError, match="odd number of frames"):
        ia.inject(make_vit(), layers=[1], compressor="conv_pool", odd_frames="error")(_video(frames=3))


def test_pooling_flops():
    vit, video = make_vit(), _video(batch=1, frames=4)
    naive = ia.count_gflops(ia.inject(vit, layers=[]), video)
    vit = make_vit()
    linear = ia.count_gflops(ia.inject(vit, layers=[0, 2], compressor="linear_pool"), video)
    vit = make_vit()
    conv = ia.count_gflops(ia.inject(vit, layers=[0, 2], compressor="conv_pool", kernel_size=3), video)
    assert linear < naive
    # conv_pool adds exactly its convolution (patch tokens) and centre taps (prefix tokens)
    k, hw = 3, GRID[0] * GRID[1]
    conv_macs = sum(t_out * (2 * k * k * C * C * hw + 2 * C * C * P) for t_out in (2, 1))
    assert conv - linear == pytest.approx(conv_macs / 1e9, rel=1e-9)


# -- token merging: the tensor math ----------------------------------------------------------------
def test_merged_token_is_size_weighted_mean_of_its_sources():
    # 6 patch tokens: A = positions 0, 2, 4; B = positions 1, 3, 5 (+1 prefix token in front).
    # The matching metric makes A0 and A1 (positions 0, 2) both join B0 (position 1) with the two
    # highest similarities; A2 (position 4) -> B1 (position 3) is the weaker edge and stays unmerged.
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.05], [1.0, 0.1], [0.2, 1.0], [0.0, 1.0], [-1.0, 0.0]]])
    x = torch.randn(1, 7, 5, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 4.0]])  # prefix, then positions 0..5
    y, s = merge_frames(x, 2, 1, sizes=sizes, metric=metric)
    patches, ps = x[0, 1:], sizes[0, 1:]
    merged = (ps[0] * patches[0] + ps[1] * patches[1] + ps[2] * patches[2]) / (ps[0] + ps[1] + ps[2])
    assert y.shape == (1, 5, 5)
    assert torch.equal(y[0, 0], x[0, 0])  # prefix token untouched
    assert torch.equal(y[0, 1], patches[4])  # kept A token
    torch.testing.assert_close(y[0, 2], merged, rtol=0, atol=1e-6)
    assert torch.equal(y[0, 3], patches[3]) and torch.equal(y[0, 4], patches[5])  # untouched B tokens
    assert s.tolist() == [[1.0, 1.0, 2.0 + 1.0 + 3.0, 1.0, 4.0]]  # prefix, A2, B0 + A0 + A1, B1, B2


def test_merge_frames_shapes_prefix_and_flops():
    torch.manual_seed(0)
    x = torch.randn(6, N, C)
    for r in (0, 1, 4, max_merge(N - P)):
        y, s = merge_frames(x, r, P)
        assert y.shape == (6, N - r, C) and s.shape == (6, N - r)
        assert torch.equal(y[:, 0], x[:, 0]) and torch.all(s[:, 0] == 1)
        torch.testing.assert_close(s.sum(-1), torch.full((6,), float(N)))
    with pytest.raises(ValueError, match="r=9"):
        merge_frames(x, 9, P)
    # the matching is a matmul that the FLOP counter sees: |A| * |B| * D multiply-adds per frame
    layer = TokenMerging(C, ToMeConfig(r=3, metric="tokens"))
    counter = ia.FlopCounter()
    with torch.no_grad(), counter:
        out = layer(x.unflatten(0, (2, 3)), LAYOUT)
    assert out.shape == (2, 3, N - 3, C) and layer.output_frames(3) == 3
    assert counter.get_total_flops() / 2 == 6 * 8 * 8 * C


@pytest.mark.parametrize("fused", [True, False])
def test_size_bias_equals_attention_over_duplicated_tokens(fused):
    torch.manual_seed(0)
    attn = Attention(C, num_heads=2).eval()
    attn.fused_attn = fused
    x = torch.randn(2, 5, C)
    counts = torch.tensor([[1, 3, 1, 2, 1], [2, 1, 1, 1, 4]])
    with torch.no_grad():
        y = attn(x, attn_mask=size_bias(counts.float(), x.dtype))
        for i in range(2):  # the same tokens with token k repeated counts[k] times, no bias
            dup = x[i].repeat_interleave(counts[i], dim=0)[None]
            first = torch.cumsum(counts[i], 0) - counts[i]
            torch.testing.assert_close(y[i], attn(dup)[0, first], rtol=1e-5, atol=1e-5)


def test_tome_config_validation():
    for bad in (-1, 1.5, True, [], [2, -1]):
        with pytest.raises(ValueError, match="r must be"):
            ToMeConfig(r=bad)
    with pytest.raises(ValueError, match="metric"):
        ToMeConfig(metric="values")
    assert ToMeConfig(r=[2, 3]).r == (2, 3)
    assert ToMeConfig.from_dict(ToMeConfig(r=[2, 3]).to_dict()) == ToMeConfig(r=(2, 3))
    with pytest.raises(ValueError, match="needs the compressor injected"):
        TokenMerging(C, ToMeConfig(r=2))(torch.randn(1, 2, N, C), LAYOUT)


# -- token merging in a model ------------------------------------------------------------------------
def _record_block_inputs(vit) -> tuple[list, list]:
    seen, handles = [], []
    for i, blk in enumerate(vit.blocks):
        handles.append(blk.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, tuple(a[0].shape)))))
    return seen, handles


def test_tome_token_counts_and_sizes():
    vit = make_vit()
    model = ia.inject(vit, layers=[0, 2], compressor="tome", r=(3, 2))
    seen, handles = _record_block_inputs(vit)
    with torch.no_grad():
        tokens = model.forward_features(_video(batch=2, frames=3))
    assert seen == [(0, (6, 17, C)), (1, (6, 14, C)), (2, (6, 14, C)), (3, (6, 12, C))]
    assert tokens.shape == (2, 3, 12, C)  # frame count unchanged
    for key, n in (("0", 14), ("2", 12)):
        sizes = model.compressors[key].token_sizes
        assert sizes.shape == (6, n)
        assert torch.equal(sizes.sum(-1), torch.full((6,), float(N)))
        assert torch.all(sizes[:, 0] == 1)  # the class token never absorbs anything
    for h in handles:
        h.remove()


def test_tome_keeps_class_token_and_merges_on_keys():
    vit = make_vit()
    captured = {}
    vit.blocks[0].register_forward_pre_hook(lambda m, a: captured.__setitem__("in", a[0]))
    vit.blocks[1].register_forward_pre_hook(lambda m, a: captured.__setitem__("merged", a[0]))
    model = ia.inject(vit, layers=[0], compressor="tome", r=5)  # module pre-hooks run before the sites
    with torch.no_grad():
        model(_video())
        with model.disable_adapters():
            captured["out"] = vit.blocks[0](captured["in"])  # the block's own output, before merging
            attn = vit.blocks[0].attn
            qkv = attn.qkv(vit.blocks[0].norm1(captured["in"]))
        keys = qkv.unflatten(-1, (3, attn.num_heads, attn.head_dim))[:, :, 1].mean(dim=-2)
        expected, _ = merge_frames(captured["out"], 5, P, metric=keys[:, P:])
    assert torch.equal(captured["merged"][:, 0], captured["out"][:, 0])
    torch.testing.assert_close(captured["merged"], expected, rtol=0, atol=1e-6)


def test_tome_proportional_attention_masks():
    vit = make_vit()
    model = ia.inject(vit, layers=[1], compressor="tome", r=4)
    masks = {}
    index = {id(blk.attn): i for i, blk in enumerate(vit.blocks)}
    video = _video()
    # probed after inject: runs after tome's sites and sees the keyword arguments they set
    with torch.no_grad(), probe([b.attn for b in vit.blocks], outermost=False,
                                before=lambda m, a, kw: masks.__setitem__(index[id(m)], kw.get("attn_mask"))):
        out = model(video)
    assert masks[0] is None and masks[1] is None
    sizes = model.compressors["1"].token_sizes
    for i in (2, 3):
        torch.testing.assert_close(masks[i], sizes.log()[:, None, None, :], rtol=0, atol=0)
    assert (sizes > 1).any()
    vit2 = make_vit()
    with torch.no_grad():
        plain = ia.inject(vit2, layers=[1], compressor="tome", r=4, prop_attn=False)(video)
    assert not torch.allclose(out, plain)


def test_tome_r_too_large_is_an_error():
    with pytest.raises(ValueError, match=r"r=9 at blocks\[1\].*16 patch tokens.*at most r=8"):
        ia.inject(make_vit(), layers=[1], compressor="tome", r=9)(_video())
    # the second layer sees 16 - 6 = 10 patch tokens: at most 5
    with pytest.raises(ValueError, match=r"r=6 at blocks\[2\].*10 patch tokens.*at most r=5"):
        ia.inject(make_vit(), layers=[0, 2], compressor="tome", r=(6, 6))(_video())
    with pytest.raises(ValueError, match="one r per layer"):
        ia.inject(make_vit(), layers=[0, 2], compressor="tome", r=(1, 2, 3))


def test_tome_unload_and_disable_restore_image_model():
    vit = make_vit()
    frame = _video(frames=1)[:, :, 0]
    with torch.no_grad():
        ref = vit(frame)
        model = ia.inject(vit, layers=[0, 2], compressor="tome", r=4)
        model(_video())
        with model.disable_adapters():
            assert torch.equal(vit(frame), ref)
        model.unload()
        assert torch.equal(vit(frame), ref)


def test_tome_flops_fall_as_r_grows():
    video = _video(batch=1, frames=2)
    flops = [
        ia.count_gflops(ia.inject(make_vit(), layers=[0, 2], compressor="tome", r=r), video)
        for r in (0, 2, 4, 5)
    ]
    assert all(a > b for a, b in zip(flops[:-1], flops[1:], strict=True)), flops
    target = (flops[1] + flops[2]) / 2
    vit = make_vit()
    r = r_for_budget(vit, video, [0, 2], target)
    assert r in (3, 4)
    cost = [
        ia.count_gflops(ia.inject(make_vit(), layers=[0, 2], compressor="tome", r=v), video)
        for v in (r - 1, r)
    ]
    assert cost[1] <= target < cost[0]
    with pytest.raises(ValueError, match="no r reaches"):
        r_for_budget(vit, video, [0, 2], flops[-1] / 2)


@pytest.mark.parametrize("metric", ["keys", "tokens"])
def test_tome_gradient_checkpointing_gives_the_same_gradients(metric):
    video = _video(frames=3)
    grads = []
    calls = []
    for ckpt in (False, True):
        vit = make_vit()
        model = ia.inject(vit, layers=[0, 2], compressor="tome", r=(3, 4), metric=metric)
        # a pre-hook: checkpoint recomputation stops early, after the last saved tensor, so a
        # forward hook of the compressor would not show the recomputation
        model.compressors["2"].register_forward_pre_hook(lambda *a, ckpt=ckpt: calls.append(ckpt))
        model.set_grad_checkpointing(ckpt)
        model(video).logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert calls.count(False) == 1 and calls.count(True) == 2  # the merge was recomputed in backward
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_tome_refuses_attention_it_cannot_bias():
    with pytest.raises(ValueError, match="prop_attn=False"):
        ia.inject(make_vit("eva"), layers=[1], compressor="tome", r=2, metric="tokens")
    with pytest.raises(ValueError, match="metric='tokens'"):
        ia.inject(make_vit("eva"), layers=[1], compressor="tome", r=2, prop_attn=False)
    with pytest.raises(ValueError, match="rope"):
        ia.inject(make_vit("eva"), layers=[1], compressor="tome", r=2, prop_attn=False, metric="tokens")
    eva = make_vit("eva", use_rot_pos_emb=False)
    model = ia.inject(eva, layers=[1], compressor="tome", r=2, prop_attn=False, metric="tokens")
    with torch.no_grad():
        assert model.forward_features(_video()).shape == (2, 4, N - 2, C)


def test_tome_budget_doc_formula():
    # merging r tokens after blocks[0] removes 12 r C^2 + 2 (N^2 - (N - r)^2) C per later block and frame,
    # minus the matching matmul |A| |B| D (D = head width for keys)
    r, video = 4, _video(batch=1, frames=1)
    base = ia.count_gflops(ia.inject(make_vit(), layers=[0], compressor="tome", r=0), video)
    merged = ia.count_gflops(ia.inject(make_vit(), layers=[0], compressor="tome", r=r), video)
    head = C // 2
    saved = 3 * (12 * r * C * C + 2 * (N * N - (N - r) ** 2) * C) - 8 * 8 * head
    assert (base - merged) * 1e9 == pytest.approx(saved, rel=1e-9)
    assert math.isclose(max_merge(16), 8) and max_merge(1) == 0 and max_merge(3) == 2


def test_registry_rejects_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        _base.register_compressor("tome")(TokenMerging)


@pytest.mark.parametrize(
    "name,options",
    [("linear_pool", {}), ("conv_pool", {"kernel_size": 3}), ("tome", {"r": [3, 2], "metric": "tokens"})],
)
def test_save_load_round_trip(tmp_path, name, options):
    model = ia.inject(make_vit(), layers=[0, 2], compressor=name, **options)
    with torch.no_grad():
        for p in model.compressors.parameters():
            p.normal_()
        video = _video()
        ref = model(video)
    model.save_pretrained(str(tmp_path))
    loaded = ia.load_pretrained(make_vit(), str(tmp_path))
    assert loaded.config.compressor == name
    with torch.no_grad():
        torch.testing.assert_close(loaded(video), ref, rtol=0, atol=0)


@pytest.mark.parametrize("metric", ["keys", "tokens"])
def test_tome_under_torch_compile_matches_eager(metric):
    model = ia.inject(make_vit(), layers=[1, 2], compressor="tome", r=2, metric=metric)
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        ref = model(video)
        out = torch.compile(model, backend="aot_eager")(video)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
