"""OpenCLIP hosts: VisionTransformer towers (both block layouts, token/avg pooling, attentional
poolers), TimmModel towers around a timm ViT, whole CLIP models, and zero-shot classification."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")

from open_clip.coca_model import CoCa, MultimodalCfg  # noqa: E402
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg  # noqa: E402
from open_clip.timm_model import TimmModel  # noqa: E402
from open_clip.transformer import Transformer, VisionTransformer  # noqa: E402

import inti_adapters as ia  # noqa: E402
from inti_adapters.errors import BareBackboneCallError, UnsupportedHostError  # noqa: E402
from inti_adapters.hosts import resolve_host  # noqa: E402
from inti_adapters.zero_shot import ZeroShotHead, build_zero_shot_classifier, zero_shot_logits  # noqa: E402

IMG, WIDTH, EMBED, CTX = 32, 64, 32, 16
VIT = dict(image_size=IMG, patch_size=8, width=WIDTH, layers=4, heads=4, mlp_ratio=2.0)
TEXT = CLIPTextCfg(context_length=CTX, vocab_size=100, width=32, heads=2, layers=2)

# VisionTransformer variants: keyword arguments of the tower
VIT_VARIANTS = {
    "tok": {},
    "avg": dict(pool_type="avg"),
    "avg_ln_after_pool": dict(pool_type="avg", final_ln_after_pool=True),
    "tok_ln_after_pool": dict(final_ln_after_pool=True),
    "attn_pool": dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2, output_tokens=True),
    # OpenCLIP 3.3's parallel/cascade poolers only run with output_dim == width
    "attn_pool_parallel": dict(attentional_pool="parallel", attn_pooler_queries=4, attn_pooler_heads=2,
                               output_dim=WIDTH),
    "attn_pool_cascade": dict(attentional_pool="cascade", attn_pooler_queries=4, attn_pooler_heads=2,
                              output_dim=WIDTH),
    "no_proj": dict(output_tokens=True),
    "seq_first": {},
    "seq_first_avg": dict(pool_type="avg"),
}
TOWERS = [*VIT_VARIANTS, "timm_token", "timm_avg_trunk_proj"]
CLIPS = ["clip_vit", "clip_seq_first", "clip_attn_pool", "clip_timm", "coca"]


def _randomise_zero_vectors(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and torch.count_nonzero(p) == 0:
                p.normal_(0, 0.05)


def _sequence_first(visual: VisionTransformer) -> VisionTransformer:
    """Same weights, blocks run (N, B, C): what OpenCLIP's Transformer does with batch_first=False."""
    tr = visual.transformer
    seq = Transformer(tr.width, tr.layers, tr.resblocks[0].attn.num_heads, mlp_ratio=2.0, batch_first=False)
    seq.load_state_dict(tr.state_dict())
    visual.transformer = seq
    return visual


def make_tower(variant: str, seed: int = 0, **extra) -> torch.nn.Module:
    """A tiny random OpenCLIP image tower in eval mode."""
    torch.manual_seed(seed)
    if variant.startswith("timm"):
        pool, proj = ("token", "linear") if variant == "timm_token" else ("avg", "")
        visual = TimmModel("vit_tiny_patch16_224", embed_dim=EMBED, pool=pool, proj=proj, pretrained=False, **extra)
        visual.set_input_size(IMG)  # 2x2 patch grid: fast
    else:
        kwargs = {"output_dim": EMBED, **VIT, **VIT_VARIANTS[variant], **extra}
        visual = VisionTransformer(**kwargs)
        if variant == "no_proj":
            visual.proj = None
        if variant.startswith("seq_first"):
            visual = _sequence_first(visual)
    _randomise_zero_vectors(visual)
    return visual.eval()


def make_clip(variant: str = "clip_vit", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if variant == "coca":  # attentional pooler with output_tokens; encode_image returns the normalised latent
        vision = CLIPVisionCfg(layers=4, width=WIDTH, head_width=16, patch_size=8, image_size=IMG, mlp_ratio=2.0,
                               attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2, output_tokens=True)
        multimodal = MultimodalCfg(context_length=CTX, width=32, heads=2, layers=1, vocab_size=100)
        coca = CoCa(embed_dim=EMBED, multimodal_cfg=multimodal, text_cfg=TEXT, vision_cfg=vision)
        _randomise_zero_vectors(coca)
        return coca.eval()
    if variant == "clip_timm":
        vision = CLIPVisionCfg(timm_model_name="vit_tiny_patch16_224", timm_pool="token", timm_proj="linear",
                               image_size=IMG)
    elif variant == "clip_attn_pool":
        vision = CLIPVisionCfg(layers=4, width=WIDTH, head_width=16, patch_size=8, image_size=IMG, mlp_ratio=2.0,
                               attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2, output_tokens=True)
    else:
        vision = CLIPVisionCfg(layers=4, width=WIDTH, head_width=16, patch_size=8, image_size=IMG, mlp_ratio=2.0)
    clip = CLIP(embed_dim=EMBED, vision_cfg=vision, text_cfg=TEXT)
    if variant == "clip_timm":
        clip.visual.set_input_size(IMG)
    if variant == "clip_seq_first":
        _sequence_first(clip.visual)
    _randomise_zero_vectors(clip)
    return clip.eval()


@functools.cache
def _built(variant: str) -> torch.nn.Module:
    return make_clip(variant) if variant in CLIPS else make_tower(variant)


def make_model(variant: str) -> torch.nn.Module:
    """A fresh copy of a tiny model (built once per session: timm's ViT-Ti init is the slow part)."""
    return copy.deepcopy(_built(variant))


def image_output(model: torch.nn.Module, frame: torch.Tensor) -> torch.Tensor:
    """What the image model gives for one frame: visual(image) (pooled only) or the normalised embedding."""
    if hasattr(model, "encode_image"):
        if isinstance(model, CLIP) and getattr(model.visual, "output_tokens", False):  # (pooled, tokens)
            return F.normalize(image_output(model.visual, frame), dim=-1)
        return model.encode_image(frame, normalize=True)
    out = model(frame)
    return out[0] if isinstance(out, tuple) else out


def static_video(batch: int = 2, frames: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    frame = torch.randn(batch, 3, IMG, IMG, generator=g)
    return frame[:, :, None].expand(-1, -1, frames, -1, -1).contiguous(), frame


def tokenize(texts: list[str]) -> torch.Tensor:
    """Toy tokenizer for the tiny text tower: SOT=1, characters in 2..97, EOT=99 (the argmax)."""
    out = torch.zeros(len(texts), CTX, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [1] + [2 + ord(c) % 96 for c in text][: CTX - 2] + [99]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def _perturb(module: torch.nn.Module, seed: int = 3, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


# -- detection and host basics -------------------------------------------------------------------
@pytest.mark.parametrize("variant", TOWERS + CLIPS)
def test_host_detection_and_basics(variant):
    model = make_model(variant)
    host = resolve_host(model)
    timm_tower = "timm" in variant
    assert host.name == ("open_clip_timm" if timm_tower else "open_clip")
    visual = model.visual if variant in CLIPS else model
    with torch.no_grad():
        out = image_output(visual, torch.randn(1, 3, IMG, IMG))
    assert host.num_features == out.shape[-1]
    assert host.in_chans == 3
    assert host.num_prefix_tokens == 1 and host.cls_index == 0
    prefix = "visual." if variant in CLIPS else ""
    if timm_tower:
        assert host.blocks is visual.trunk.blocks
        assert host.embed_dim == 192 and host.grid_size(IMG, IMG) == (2, 2)
        assert host.head_module_names() == [prefix + "head", prefix + "trunk.head"]
    else:
        assert host.blocks is visual.transformer.resblocks  # the image tower's blocks, never the text tower's
        assert host.embed_dim == WIDTH and host.grid_size(IMG, IMG) == (4, 4)
        assert host.head_module_names() == [prefix + "proj"]
        assert host.batch_first == ("seq_first" not in variant)


def test_layout_is_read_from_the_attention_modules_without_a_batch_first_flag():
    visual = make_model("seq_first")
    del visual.transformer.batch_first  # an OpenCLIP release without the flag
    assert resolve_host(visual).batch_first is False
    assert resolve_host(make_model("tok")).batch_first is True


# -- the image model, reproduced ------------------------------------------------------------------
@pytest.mark.parametrize("variant", TOWERS + CLIPS)
def test_one_frame_reproduces_the_image_model_exactly(variant):
    model = make_model(variant)
    frame = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        expected = image_output(model, frame)
        out = ia.inject(model, layers=[])(frame[:, :, None])
    assert out.shape == expected.shape
    assert torch.equal(out, expected)


@pytest.mark.parametrize("variant", TOWERS + CLIPS)
@pytest.mark.parametrize("frames", [4, 5])
def test_static_video_equals_image_model(variant, frames):
    model = make_model(variant)
    video, frame = static_video(frames=frames)
    with torch.no_grad():
        expected = image_output(model, frame)
        out = ia.inject(model, layers=[1, 2])(video)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["tok", "seq_first", "attn_pool", "timm_token", "clip_vit"])
def test_naive_baseline_is_the_mean_of_per_frame_outputs(variant):
    model = make_model(variant)
    video = torch.randn(2, 3, 3, IMG, IMG)
    with torch.no_grad():
        if isinstance(model, CLIP):
            per_frame = torch.stack([model.encode_image(video[:, :, t]) for t in range(3)], 1)
            expected = F.normalize(per_frame.mean(1), dim=-1)
        else:
            expected = torch.stack([image_output(model, video[:, :, t]) for t in range(3)], 1).mean(1)
        out = ia.inject(model, layers=[])(video)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    if isinstance(model, CLIP):
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


# -- frame schedule, checkpointing, unload, save/load ----------------------------------------------
@pytest.mark.parametrize("variant", ["tok", "seq_first", "clip_vit"])
def test_frame_schedule_16_16_8_4(variant):
    model = make_model(variant)
    video_model = ia.inject(model, layers=[1, 2])
    batch_dim = 0 if video_model.host.batch_first else 1
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[batch_dim]))
             for b in video_model.host.blocks]
    with torch.no_grad():
        video_model(torch.randn(2, 3, 16, IMG, IMG))
    for h in hooks:
        h.remove()
    assert [s // 2 for s in seen] == [16, 16, 8, 4] == video_model.frame_schedule(16)


@pytest.mark.parametrize("variant", ["tok", "seq_first", "clip_timm"])
def test_gradient_checkpointing_same_loss_and_grads(variant):
    model = make_model(variant).train()
    video_model = ia.inject(model, layers=[1, 2])
    _perturb(video_model.compressors)  # a trained-looking InTI layer: non-trivial weights and grads
    video = torch.randn(2, 3, 4, IMG, IMG)
    calls = []
    # a pre-hook: checkpointing may stop recomputing once the saved tensors are back (early stop)
    hook = video_model.compressors["1"].register_forward_pre_hook(lambda *a: calls.append(1))

    def loss_and_grads():
        video_model.zero_grad(set_to_none=True)
        calls.clear()
        loss = video_model(video).square().sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in video_model.named_parameters() if p.grad is not None}

    loss_ref, grads_ref = loss_and_grads()
    assert len(calls) == 1
    video_model.set_grad_checkpointing(True)
    loss_ckpt, grads_ckpt = loss_and_grads()
    assert len(calls) == 2  # the InTI layer ran again (from its hook) when backward recomputed the block
    hook.remove()
    torch.testing.assert_close(loss_ckpt, loss_ref, atol=1e-6, rtol=1e-6)
    assert grads_ckpt.keys() == grads_ref.keys()
    assert any(k.startswith("compressors.") for k in grads_ref)
    for k in grads_ref:
        torch.testing.assert_close(grads_ckpt[k], grads_ref[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["tok", "seq_first", "clip_vit", "clip_timm"])
def test_unload_restores_bit_identical_outputs(variant):
    model = make_model(variant)
    frame = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        before = image_output(model, frame)
        video_model = ia.inject(model, layers=[0, 2])
        _perturb(video_model.compressors)
        video_model(torch.randn(1, 3, 4, IMG, IMG))
        with pytest.raises(BareBackboneCallError):
            image_output(model, frame)
        assert video_model.unload() is model
        after = image_output(model, frame)
    assert torch.equal(before, after)


def test_save_load_round_trip_on_a_clip_visual(tmp_path):
    visual = make_model("tok")
    fresh = copy.deepcopy(visual)
    video_model = ia.inject(visual, layers=[1, 2])
    _perturb(video_model.compressors)
    video_model.save_pretrained(str(tmp_path))
    assert (tmp_path / "inti_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    loaded = ia.load_pretrained(fresh, str(tmp_path))
    assert loaded.host.name == "open_clip"
    video = torch.randn(2, 3, 4, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(loaded(video), video_model(video), atol=0, rtol=0)


def test_save_load_round_trip_of_a_clip_with_a_zero_shot_head(tmp_path):
    clip = make_model("clip_vit")
    fresh = copy.deepcopy(clip)
    classifier = build_zero_shot_classifier(clip, tokenize, ["run", "jump", "swim"], ["a video of {}."])
    video_model = ia.inject(clip, layers=[1], head=ZeroShotHead(classifier, logit_scale=50.0),
                            freeze_backbone=True)
    _perturb(video_model.compressors)
    video_model.save_pretrained(str(tmp_path))
    loaded = ia.load_pretrained(fresh, str(tmp_path), head=ZeroShotHead(torch.zeros_like(classifier)))
    assert torch.equal(loaded.head.classifier, classifier) and float(loaded.head.logit_scale) == 50.0
    video = torch.randn(1, 3, 4, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(loaded(video), video_model(video), atol=0, rtol=0)


# -- errors -----------------------------------------------------------------------------------------
def test_unknown_open_clip_tower_gets_a_clear_error():
    torch.manual_seed(0)
    resnet_clip = CLIP(embed_dim=EMBED, text_cfg=TEXT,
                       vision_cfg=CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, head_width=16, image_size=IMG))
    for model in (resnet_clip, resnet_clip.visual):
        with pytest.raises(UnsupportedHostError) as err:
            ia.inject(model, layers=[1])
        msg = str(err.value)
        assert "ModifiedResNet" in msg and "open_clip:" in msg and "open_clip_timm:" in msg
        assert "register_host" in msg
    with pytest.raises(UnsupportedHostError, match=r"host 'open_clip' cannot describe .*ModifiedResNet"):
        ia.inject(resnet_clip, layers=[1], host="open_clip")
    cnn_tower = TimmModel("resnet10t", embed_dim=EMBED, pool="avg", proj="linear", pretrained=False)
    with pytest.raises(UnsupportedHostError, match=r"open_clip_timm: missing trunk\.blocks"):
        ia.inject(cnn_tower, layers=[1])


def test_wrong_image_size_is_refused():
    video_model = ia.inject(make_model("tok"), layers=[1])
    with pytest.raises(ValueError, match=r"frames are 40x40 .* takes 32x32 .* 4x4 patch grid"):
        video_model(torch.randn(1, 3, 2, 40, 40))


@pytest.mark.parametrize("variant", ["tok", "timm_token"])
def test_patch_dropout_is_refused_with_inti_layers(variant):
    extra = dict(patch_dropout=0.5) if variant == "tok" else dict(patch_drop=0.5)
    model = make_tower(variant, **extra)
    assert resolve_host(model).patch_dropout_active()
    with pytest.raises(ValueError, match="patch dropout"):
        ia.inject(model, layers=[1])
    ia.inject(model, layers=[])  # the naive baseline does not pair tokens
    assert not resolve_host(make_model(variant)).patch_dropout_active()


# -- freezing ---------------------------------------------------------------------------------------
def test_lora_preset_targets_the_timm_trunk_only():
    clip = make_model("clip_timm")
    targets = set(ia.lora_preset(clip).target_modules)
    names = [n for n, _ in clip.named_modules() if n.split(".")[-1] in targets]
    assert names and all(n.startswith("visual.trunk.blocks.") for n in names)


@pytest.mark.parametrize("variant, projection", [("clip_timm", "backbone.visual.head.proj.weight"),
                                                  ("timm_avg_trunk_proj", "backbone.trunk.head.weight")])
def test_freeze_backbone_keeps_the_timm_tower_projection_trainable(variant, projection):
    video_model = ia.inject(make_model(variant), layers=[1], freeze_backbone=True)
    trainable = {n for n, p in video_model.named_parameters() if p.requires_grad}
    heads = set(video_model.head_parameter_names())
    assert projection in trainable and projection in heads
    assert all(n.startswith("compressors.") or n in heads for n in trainable)
    assert any(n.startswith("compressors.") for n in trainable)


@pytest.mark.parametrize("train_head", [True, False])
def test_freeze_backbone_keeps_the_vit_projection_parameter_trainable(train_head):
    video_model = ia.inject(make_model("clip_vit"), layers=[1], freeze_backbone=True, train_head=train_head)
    trainable = {n for n, p in video_model.named_parameters() if p.requires_grad}
    assert ("backbone.visual.proj" in trainable) == train_head  # a bare Parameter, not a module
    assert video_model.head_parameter_names() == ["backbone.visual.proj"]
    assert all(n.startswith("compressors.") or n == "backbone.visual.proj" for n in trainable)
    assert any(n.startswith("compressors.") for n in trainable)


# -- zero-shot --------------------------------------------------------------------------------------
CLASSES = ["archery", "bowling", "cooking", "dancing", "surfing"]
TEMPLATES = ["a video of {}.", lambda c: f"someone doing {c}", "{} in slow motion"]


def test_zero_shot_classifier_matches_a_hand_computation():
    clip = make_model("clip_vit")
    classifier = build_zero_shot_classifier(clip, tokenize, CLASSES, TEMPLATES, batch_size=4)
    assert classifier.shape == (EMBED, len(CLASSES))
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(len(CLASSES)))
    with torch.no_grad():
        for k, name in enumerate(CLASSES):
            texts = [t.replace("{}", name) if isinstance(t, str) else t(name) for t in TEMPLATES]
            per_template = clip.encode_text(tokenize(texts), normalize=True)
            expected = F.normalize(per_template.mean(0), dim=-1)
            torch.testing.assert_close(classifier[:, k], expected, atol=1e-6, rtol=0)
    one_batch = build_zero_shot_classifier(clip, tokenize, CLASSES, TEMPLATES, batch_size=256)
    torch.testing.assert_close(one_batch, classifier, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["clip_vit", "clip_timm"])
def test_zero_shot_logits_and_head_agree_with_the_hand_computation(variant):
    clip = make_model(variant)
    classifier = build_zero_shot_classifier(clip, tokenize, CLASSES, TEMPLATES)
    video = torch.randn(2, 3, 3, IMG, IMG)
    with torch.no_grad():
        frames = torch.stack([clip.encode_image(video[:, :, t]) for t in range(3)], 1)
        by_hand = 100.0 * F.normalize(frames.mean(1), dim=-1) @ classifier
        video_model = ia.inject(clip, layers=[])
        logits = zero_shot_logits(video_model(video), classifier)
        video_model.unload()
        with_head = ia.inject(clip, layers=[], head=ZeroShotHead(classifier))(video)
    assert logits.shape == (2, len(CLASSES))
    torch.testing.assert_close(logits, by_hand, atol=1e-4, rtol=0)
    torch.testing.assert_close(with_head, by_hand, atol=1e-4, rtol=0)


def test_zero_shot_head_on_the_visual_tower_equals_the_clip_video_model():
    clip = make_model("clip_vit")
    classifier = build_zero_shot_classifier(clip, tokenize, CLASSES, TEMPLATES)
    video, _ = static_video(frames=4)
    video = video + 0.1 * torch.randn_like(video)
    with torch.no_grad():
        tower = ia.inject(clip.visual, layers=[1, 2], head=ZeroShotHead(classifier))
        from_tower = tower(video)
        tower.unload()
        from_clip = zero_shot_logits(ia.inject(clip, layers=[1, 2])(video), classifier)
    torch.testing.assert_close(from_tower, from_clip, atol=1e-4, rtol=0)


def test_zero_shot_bad_inputs_are_refused():
    clip = make_model("clip_vit")
    with pytest.raises(ValueError, match="placeholder"):
        build_zero_shot_classifier(clip, tokenize, CLASSES, ["a video"])
    with pytest.raises(ValueError, match="class_names"):
        build_zero_shot_classifier(clip, tokenize, [], TEMPLATES)
    with pytest.raises(TypeError, match="encode_text"):
        build_zero_shot_classifier(clip.visual, tokenize, CLASSES, TEMPLATES)
    with pytest.raises(TypeError, match="tokenizer must return"):
        build_zero_shot_classifier(clip, lambda texts: tokenize(texts)[0], CLASSES, TEMPLATES)
    with pytest.raises(ValueError, match="embed_dim 32"):
        zero_shot_logits(torch.randn(2, 16), torch.randn(32, 5))
    with pytest.raises(ValueError, match="embed_dim, num_classes"):
        ZeroShotHead(torch.randn(32))


def test_injecting_the_tower_of_an_injected_clip_model_is_refused():
    clip = make_clip("clip_vit")
    ia.inject(clip, layers=[1])
    with pytest.raises(ValueError, match="already has inti_adapters hooks"):
        ia.inject(clip.visual, layers=[2])
