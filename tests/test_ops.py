"""``ops.DepthwiseConv3d`` equals ``nn.Conv3d(C, C, k, padding=k // 2, groups=C)``: outputs, gradients, state dicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inti_adapters.ops import DepthwiseConv3d, depthwise_conv3d

C = 6
FORMULATIONS = ["taps", "conv3d"]  # depth-wise 2-D taps + shifted adds; 3-D forward + hand-written backward


def reference(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``nn.Conv3d`` on ``(B, T, H, W, C)``: permute to NCTHW and back."""
    return conv(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)


def pair(kernel=(3, 3, 3), channels=C, bias=True, seed=0, dtype=torch.float64, formulation=None):
    """A ``DepthwiseConv3d`` and an ``nn.Conv3d`` with the same (random) parameters."""
    torch.manual_seed(seed)
    ref = nn.Conv3d(channels, channels, kernel, padding=tuple(k // 2 for k in kernel), groups=channels, bias=bias)
    ref = ref.to(dtype)
    with torch.no_grad():
        if bias:
            ref.bias.normal_()
    ours = DepthwiseConv3d(channels, kernel, bias=bias, formulation=formulation).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def grads(module: nn.Module, x: torch.Tensor, out_grad: torch.Tensor, fn) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    params = list(module.parameters())
    y = fn(module, x)
    return [y, *torch.autograd.grad(y, [x, *params], out_grad)]


SHAPES = [(2, 1, 4, 5), (2, 2, 3, 3), (1, 3, 5, 7), (3, 8, 4, 4), (2, 5, 1, 1)]  # (B, T, H, W)


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kernel", [(3, 3, 3), (3, 1, 1), (1, 3, 3), (5, 3, 1)], ids=str)
def test_outputs_and_gradients_equal_conv3d(shape, kernel, formulation):
    ours, ref = pair(kernel, formulation=formulation)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, C, generator=g, dtype=torch.float64)
    out_grad = torch.randn(*shape, C, generator=g, dtype=torch.float64)
    got = grads(ours, x, out_grad, lambda m, v: m(v))
    want = grads(ref, x, out_grad, reference)
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_float32_and_without_bias(formulation):
    ours, ref = pair(bias=False, dtype=torch.float32, formulation=formulation)
    x = torch.randn(2, 8, 7, 5, C)
    out_grad = torch.randn_like(x)
    for a, b in zip(grads(ours, x, out_grad, lambda m, v: m(v)), grads(ref, x, out_grad, reference), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_non_contiguous_input(formulation):
    ours, ref = pair(formulation=formulation)
    tokens = torch.randn(2, 6, 1 + 3 * 4, C, dtype=torch.float64)  # a class token before a 3x4 grid
    x = tokens[:, :, 1:].reshape(2, 6, 3, 4, C)  # a view with the class token's stride
    assert not x.is_contiguous()
    torch.testing.assert_close(ours(x), reference(ref, x.contiguous()), rtol=1e-10, atol=1e-10)
    strided = torch.randn(2, 12, 3, 4, C, dtype=torch.float64)[:, ::2]  # every other frame
    torch.testing.assert_close(ours(strided), reference(ref, strided.contiguous()), rtol=1e-10, atol=1e-10)
    channels_first = torch.randn(2, C, 6, 3, 4, dtype=torch.float64).permute(0, 2, 3, 4, 1)
    torch.testing.assert_close(ours(channels_first), reference(ref, channels_first), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("kernel", [(3, 3, 3), (3, 1, 1)], ids=str)
def test_bf16_autocast_matches_conv3d(kernel, formulation):
    ours, ref = pair(kernel, dtype=torch.float32, formulation=formulation)
    x = torch.randn(2, 8, 5, 5, C)
    out_grad = torch.randn_like(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grads(ours, x, out_grad, lambda m, v: m(v))
        want = grads(ref, x, out_grad, reference)
    assert got[0].dtype == want[0].dtype
    assert [g.dtype for g in got[1:]] == [g.dtype for g in want[1:]] == [torch.float32] * 3
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05 * b.float().abs().max().item())


def test_state_dicts_load_both_ways_and_default_init_matches():
    torch.manual_seed(3)
    ref = nn.Conv3d(C, C, 3, padding=1, groups=C)
    torch.manual_seed(3)
    ours = DepthwiseConv3d(C)
    assert list(ours.state_dict()) == ["weight", "bias"]
    for k, v in ref.state_dict().items():  # the same random draws as nn.Conv3d's default initialisation
        assert torch.equal(ours.state_dict()[k], v), k
    fresh_ref, fresh_ours = nn.Conv3d(C, C, 3, padding=1, groups=C), DepthwiseConv3d(C)
    fresh_ours.load_state_dict(ref.state_dict())
    fresh_ref.load_state_dict(ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh_ours.parameters(), fresh_ref.parameters(), strict=True))
    with pytest.raises(RuntimeError, match="size mismatch"):
        DepthwiseConv3d(C, (3, 1, 1)).load_state_dict(ref.state_dict())


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_flop_count_equals_conv3d(formulation):
    import inti_adapters as ia

    x = torch.randn(2, 8, 5, 5, C)
    ours, ref = pair(dtype=torch.float32, formulation=formulation)
    counts = []
    for fn in (lambda: ours(x), lambda: reference(ref, x)):
        counter = ia.FlopCounter()
        with torch.no_grad(), counter:
            fn()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_compiles(formulation):
    ours, ref = pair(dtype=torch.float32, formulation=formulation)
    x = torch.randn(2, 4, 3, 3, C)
    torch.testing.assert_close(torch.compile(ours)(x), reference(ref, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(x=torch.randn(2, 3, 4, C), weight=torch.randn(C, 1, 3, 3, 3)), r"\(B, T, H, W, C\)"),
        (dict(x=torch.randn(1, 2, 3, 3, C), weight=torch.randn(C + 1, 1, 3, 3, 3)), "does not fit"),
    ],
)
def test_bad_shapes(args, match):
    with pytest.raises(ValueError, match=match):
        depthwise_conv3d(**args)


@pytest.mark.parametrize("kernel", [2, (3, 3), (3, 0, 1), (3, True, 1)])
def test_bad_kernel(kernel):
    with pytest.raises(ValueError, match="kernel_size"):
        DepthwiseConv3d(C, kernel)


def test_default_formulation_and_bad_formulation():
    x, w = torch.randn(1, 2, 3, 3, C), torch.randn(C, 1, 3, 3, 3)
    assert depthwise_conv3d(x, w).grad_fn is None  # no grad needed: plain forward either way
    y = depthwise_conv3d(x, w.requires_grad_())
    assert "Conv3dFn" in type(y.grad_fn).__name__  # oneDNN's 3-D forward on the CPU
    with pytest.raises(ValueError, match="formulation"):
        depthwise_conv3d(x, w, formulation="fft")
    with pytest.raises(ValueError, match="formulation"):
        DepthwiseConv3d(C, formulation="fft")


# -- the temporal adapters that use it: same function as their old nn.Conv3d formulation ---------------
def _perturbed(module: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return module


def _old_conv(conv: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The adapters' old formulation: ``(B, T, H, W, C)`` -> NCTHW -> ``F.conv3d`` -> back."""
    k = conv.weight.shape[2:]
    vol = z.permute(0, 4, 1, 2, 3)
    out = torch.nn.functional.conv3d(vol, conv.weight, conv.bias, padding=tuple(i // 2 for i in k),
                                     groups=z.shape[-1])
    return out.permute(0, 2, 3, 4, 1)


@pytest.mark.parametrize("kernel", [(3, 1, 1), (3, 3, 3)], ids=str)
def test_conv_bottleneck_equals_its_conv3d_formulation(kernel):
    from inti_adapters import TokenLayout
    from inti_adapters.temporal import STAdapter, STAdapterConfig

    adapter = _perturbed(STAdapter(16, STAdapterConfig(kernel_size=kernel)).double())
    assert adapter.conv.weight.shape == (8, 1, *kernel) and adapter.conv.bias.shape == (8,)
    x = torch.randn(2, 4, 1 + 3 * 3, 16, dtype=torch.float64, requires_grad=True)
    got = adapter(x, TokenLayout(1, 0, (3, 3)))
    z = adapter.down(x[:, :, 1:]).reshape(2, 4, 3, 3, 8)
    d = adapter.up(adapter.act(_old_conv(adapter.conv, z).reshape(2, 4, 9, 8)))
    want = torch.cat([x[:, :, :1], x[:, :, 1:] + d], dim=2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    ga = torch.autograd.grad(got.sum(), [x, *adapter.parameters()])
    gb = torch.autograd.grad(want.sum(), [x, *adapter.parameters()])
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_global_mhra_position_embedding_equals_its_conv3d_formulation():
    from inti_adapters import TokenLayout
    from inti_adapters.temporal import GlobalMHRA, GlobalMHRAConfig

    adapter = _perturbed(GlobalMHRA(16, 16, [1], GlobalMHRAConfig()).double())
    x = torch.randn(2, 4, 1 + 3 * 4, 16, dtype=torch.float64)
    got = adapter._with_dpe(1, x, TokenLayout(1, 0, (3, 4)))
    conv = adapter.dpe["1"]
    want = torch.cat([x[:, :, :1], x[:, :, 1:] + _old_conv(conv, x[:, :, 1:].reshape(2, 4, 3, 4, 16)).reshape(2, 4, 12, 16)],
                     dim=2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
