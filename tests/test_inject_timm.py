"""inject() on timm hosts: the static-video invariant for every variant, frame schedules,
unload, freezing, layouts, gradient checkpointing and autocast. torch.compile of injected models:
tests/test_temporal.py (inductor, InTI with every temporal adapter) and tests/test_surgery.py (every
extension kind)."""

from __future__ import annotations

import pytest
import torch
from conftest import IMG, VARIANTS, make_vit, static_video

import inti_adapters as ia


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("frames", [4, 5])
def test_static_video_equals_image_model(variant, frames):
    size = IMG + 8 if variant == "dynamic_img_size" else IMG  # dynamic size: not the built size
    vit = make_vit(variant)
    video, frame = static_video(frames=frames, size=size)
    with torch.no_grad():
        expected = vit(frame)
        model = ia.inject(vit, layers=[1, 2])
        out = model(video)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_naive_baseline_is_mean_of_per_frame_logits():
    vit = make_vit()
    video = torch.randn(2, 3, 3, IMG, IMG)
    with torch.no_grad():
        per_frame = torch.stack([vit(video[:, :, t]) for t in range(3)], 1)
        out = ia.inject(vit, layers=[])(video)
    torch.testing.assert_close(out, per_frame.mean(1), atol=1e-5, rtol=0)


def _block_batch_sizes(model, video):
    seen = []
    hs = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0])) for b in model.host.blocks]
    with torch.no_grad():
        model(video)
    for h in hs:
        h.remove()
    return seen


def test_frame_schedule_16_8_4_on_vit_b_depth():
    vit = make_vit(depth=12, embed_dim=16)
    model = ia.inject(vit, layers=[4, 6])
    seen = _block_batch_sizes(model, torch.randn(2, 3, 16, IMG, IMG))
    assert [s // 2 for s in seen] == [16] * 5 + [8] * 2 + [4] * 5
    assert model.frame_schedule(16) == [16] * 5 + [8] * 2 + [4] * 5


@pytest.mark.parametrize("t, schedule", [(1, [1, 1, 1, 1]), (2, [2, 2, 1, 1]), (5, [5, 5, 3, 2]),
                                         (6, [6, 6, 3, 2]), (7, [7, 7, 4, 2])])
def test_odd_and_tiny_frame_counts(t, schedule):
    model = ia.inject(make_vit(), layers=[1, 2])
    seen = _block_batch_sizes(model, torch.randn(3, 3, t, IMG, IMG))
    assert [s // 3 for s in seen] == schedule == model.frame_schedule(t)


def test_more_frames_than_the_temporal_table_is_refused_clearly():
    model = ia.inject(make_vit(), layers=[1, 2], max_frames=4)
    model(torch.randn(1, 3, 8, IMG, IMG))
    with pytest.raises(ValueError, match="max_frames>=5"):
        model(torch.randn(1, 3, 10, IMG, IMG))
    # the failed forward did not leave a stale context behind
    model(torch.randn(1, 3, 8, IMG, IMG))


def test_unload_restores_bit_identical_outputs_and_flags():
    vit = make_vit()
    vit.blocks[0].attn.qkv.weight.requires_grad_(False)  # a flag the user set
    image = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        before = vit(image)
    sd_before = {k: v.clone() for k, v in vit.state_dict().items()}
    model = ia.inject(vit, layers=[1, 2], freeze_backbone=True)
    assert set(vit.state_dict()) == set(sd_before), "inject must not add keys to the backbone"
    with torch.no_grad():
        model(torch.randn(2, 3, 4, IMG, IMG))
    back = model.unload()
    assert back is vit
    with torch.no_grad():
        after = vit(image)
    assert torch.equal(before, after)
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in vit.blocks)
    assert not vit.blocks[0].attn.qkv.weight.requires_grad
    assert all(p.requires_grad for n, p in vit.named_parameters() if n != "blocks.0.attn.qkv.weight")
    assert all(torch.equal(v, sd_before[k]) for k, v in vit.state_dict().items())
    with pytest.raises(RuntimeError, match="unloaded"):
        model(torch.randn(1, 3, 2, IMG, IMG))
    # the backbone can be injected again after unload
    ia.inject(vit, layers=[1])


def test_injecting_twice_is_refused():
    vit = make_vit()
    model = ia.inject(vit, layers=[1, 2])
    with pytest.raises(ValueError, match="already has inti_adapters hooks"):
        ia.inject(vit, layers=[3])
    with pytest.raises(ValueError, match="already an InTIModel"):
        ia.inject(model, layers=[3])


def test_disable_adapters_allows_image_inference():
    vit = make_vit()
    image = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ref = vit(image)
        model = ia.inject(vit, layers=[1, 2])
        with model.disable_adapters():
            assert torch.equal(vit(image), ref)
        with pytest.raises(ia.BareBackboneCallError):
            vit(image)


def test_freeze_backbone_trains_only_added_modules_and_head(capsys):
    model = ia.inject(make_vit(), layers=[1, 2], freeze_backbone=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.startswith("compressors.") or n.startswith("backbone.head.")}
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    n_train, n_all = model.get_nb_trainable_parameters()
    assert f"trainable params: {n_train:,} || all params: {n_all:,}" in out
    assert "backbone: 0/" in out
    # default: full fine-tuning as in the paper
    model2 = ia.inject(make_vit(), layers=[1, 2])
    assert all(p.requires_grad for p in model2.parameters())
    model3 = ia.inject(make_vit(), layers=[1, 2], freeze_backbone=True, train_head=False)
    assert {n for n, p in model3.named_parameters() if p.requires_grad} == {
        n for n, _ in model3.named_parameters() if n.startswith("compressors.")}


def test_ntchw_layout_matches_ncthw():
    vit = make_vit()
    video = torch.randn(2, 3, 4, IMG, IMG)
    with torch.no_grad():
        a = ia.inject(vit, layers=[1])(video)
        vit2 = make_vit()
        b = ia.inject(vit2, layers=[1], input_layout="NTCHW")(video.transpose(1, 2).contiguous())
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_custom_head_on_video_features():
    vit = make_vit(num_classes=0)
    head = torch.nn.Linear(32, 7)
    model = ia.inject(vit, layers=[1, 2], head=head)
    video = torch.randn(2, 3, 4, IMG, IMG)
    out = model(video)
    assert out.shape == (2, 7)
    torch.testing.assert_close(out, head(model.forward_head(model.forward_features(video), pre_logits=True)))


def _loss_and_grads(model, video, target):
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(video), target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _trained_inti(vit, layers=(1, 2)):
    model = ia.inject(vit, layers=list(layers)).train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # make the InTI layers non-trivial so their gradients matter
        for p in model.compressors.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_gradient_checkpointing_gives_same_loss_and_grads():
    video, target = torch.randn(2, 3, 4, IMG, IMG), torch.tensor([1, 3])
    plain = _trained_inti(make_vit())
    ckpt = _trained_inti(make_vit())
    ckpt.set_grad_checkpointing(True)
    assert ckpt.backbone.grad_checkpointing
    l1, g1 = _loss_and_grads(plain, video, target)
    l2, g2 = _loss_and_grads(ckpt, video, target)
    torch.testing.assert_close(l1, l2)
    assert g1.keys() == g2.keys() and any(k.startswith("compressors.") for k in g1)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-6, rtol=1e-5, msg=k)


def test_bfloat16_autocast():
    model = _trained_inti(make_vit()).eval()
    video = torch.randn(2, 3, 4, IMG, IMG)
    with torch.no_grad():
        ref = model(video)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(video)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_model_in_bfloat16_keeps_dtype():
    vit = make_vit().to(torch.bfloat16)
    model = ia.inject(vit, layers=[1, 2])
    assert all(p.dtype == torch.bfloat16 for p in model.compressors.parameters())
    out = model(torch.randn(1, 3, 4, IMG, IMG, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
