"""Bad input gets a clear error that says what was received and what is expected."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import IMG, make_vit

import inti_adapters as ia


@pytest.fixture
def model():
    return ia.inject(make_vit(), layers=[1, 2])


def test_four_d_tensor(model):
    with pytest.raises(ValueError, match=r"5-D video of shape \(B, 3, T, H, W\).*4-D tensor of shape \(2, 3, 32, 32\).*unsqueeze"):
        model(torch.randn(2, 3, IMG, IMG))


def test_wrong_channel_count(model):
    with pytest.raises(ValueError, match=r"expected 3 channels.*\(2, 4, 3, 32, 32\) with 4 channels.*NTCHW"):
        model(torch.randn(2, 4, 3, IMG, IMG))


def test_uint8_input(model):
    with pytest.raises(TypeError, match=r"float video.*torch.uint8.*normalize_video"):
        model(torch.zeros(2, 3, 4, IMG, IMG, dtype=torch.uint8))


def test_not_a_tensor(model):
    with pytest.raises(TypeError, match="got list"):
        model([1, 2, 3])


def test_empty_batch_and_no_frames(model):
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.randn(0, 3, 4, IMG, IMG))
    with pytest.raises(ValueError, match="0 frames"):
        model(torch.randn(2, 3, 0, IMG, IMG))


def test_wrong_image_size(model):
    with pytest.raises(ValueError, match=r"frames are 48x48 but this backbone was built for 32x32.*dynamic_img_size"):
        model(torch.randn(1, 3, 2, 48, 48))


@pytest.mark.parametrize(
    "layers, exc, match",
    [
        ([1, 4], ValueError, r"out of range: the backbone has 4 blocks \(valid indices 0..3\), got \[4\]"),
        ([2, 2], ValueError, "duplicates"),
        ([2, 1], ValueError, r"sorted ascending.*\[1, 2\]"),
        ([-1], ValueError, "negative index -1"),
        (4, TypeError, "list of block indices"),
        ([1.0], TypeError, "must hold ints"),
    ],
)
def test_bad_layers(layers, exc, match):
    with pytest.raises(exc, match=match):
        ia.inject(make_vit(), layers=layers)


def test_bad_compressor_options():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['fusoin'\] for compressor 'inti'"):
        ia.inject(make_vit(), layers=[1], fusoin="add")
    with pytest.raises(ValueError, match="fusion must be one of"):
        ia.inject(make_vit(), layers=[], fusion="mul")  # validated even without layers
    with pytest.raises(ValueError, match=r"unknown compressor 'nope'; registered compressors: \[.*'inti'"):
        ia.inject(make_vit(), layers=[1], compressor="nope")


def test_bare_backbone_call_while_hooked(model):
    with pytest.raises(ia.BareBackboneCallError, match="called directly.*disable_adapters.*unload"):
        model.backbone(torch.randn(8, 3, IMG, IMG))
    assert isinstance(ia.BareBackboneCallError("x"), ValueError)


def test_unknown_host():
    with pytest.raises(ia.UnsupportedHostError, match=r"(?s)torch.nn.modules.container.Sequential.*missing blocks"):
        ia.inject(torch.nn.Sequential(torch.nn.Linear(2, 2)), layers=[0])
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=2,
                             embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    with pytest.raises(ia.UnsupportedHostError, match=r"(?s)SwinTransformer.*timm: missing blocks.*register_host"):
        ia.inject(swin, layers=[0])


def test_patch_dropout_is_refused_with_inti_layers():
    vit = make_vit(patch_drop_rate=0.5)
    with pytest.raises(ValueError, match="patch dropout"):
        ia.inject(vit, layers=[1])
    ia.inject(vit, layers=[])  # the naive baseline does not pair tokens


def test_unknown_host_name():
    with pytest.raises(ValueError, match=r"unknown host 'nope'; registered hosts: \['timm'"):
        ia.inject(make_vit(), layers=[1], host="nope")


def test_refused_option_leaves_no_hooks_behind():
    eva = make_vit("eva")
    image = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        ref = eva(image)
    with pytest.raises(ValueError, match="rope"):
        ia.inject(eva, layers=[1, 2], compressor="tome", r=2, metric="tokens", prop_attn=False)
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in eva.blocks)
    with torch.no_grad():
        assert torch.equal(eva(image), ref)
    ia.inject(eva, layers=[1, 2])  # and it can be injected with something it supports


# -- issue 23: normalize_video with a mean/std that does not fit the video ---------------------------
@pytest.mark.parametrize("mean_std, match", [
    (((0.5, 0.5), (0.0, 0.0)), r"mean has 2 values \[0.5, 0.5\] but the video has 3 channels"),
    (((0.5, 0.5, 0.5), (0.5, 0.0, 0.5)), r"std finite and > 0 .*std \[0.5, 0.0, 0.5\]"),
    (((0.5, float("nan"), 0.5), (0.5, 0.5, 0.5)), r"mean must be finite.*nan"),
    (((0.5, 0.5, 0.5), (0.5,)), r"std has 1 values \[0.5\] but the video has 3 channels"),
    ((0.5, 0.5), r"a pair \(mean, std\) of 3 numbers each, got \(0.5, 0.5\)"),
])
def test_normalize_video_refuses_a_mean_std_that_does_not_fit(mean_std, match):
    clip = torch.randint(0, 256, (1, 3, 2, 4, 4), dtype=torch.uint8)
    with pytest.raises(ValueError, match=match):
        ia.normalize_video(clip, mean_std)
    out = ia.normalize_video(clip, ((0.5, 0.5, 0.5), (0.25, 0.5, 1.0)))
    torch.testing.assert_close(out[:, 1], (clip[:, 1] / 255.0 - 0.5) / 0.5)
    assert torch.isfinite(out).all()
    ntchw = ia.normalize_video(clip.transpose(1, 2), ((0.5, 0.5, 0.5), (0.25, 0.5, 1.0)), layout="NTCHW")
    torch.testing.assert_close(ntchw, out.transpose(1, 2))
