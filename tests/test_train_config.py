"""Training config (YAML + overrides, errors), backbone building and local weights, optimizer groups."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from inti_adapters.temporal import PRESETS
from inti_adapters.train import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    TrainLoopConfig,
    WarmupCosine,
    build_model,
    build_optimizer,
    build_scheduler,
    create_backbone,
    deepspeed_config,
    load_config,
    param_groups,
)

TINY_KW = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2, "depth": 4}
TINY = ["model.name=vit_base_patch16_clip_224", f"model.model_kwargs={json.dumps(TINY_KW)}", "model.num_classes=5"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- YAML + overrides ---------------------------------------------------------------------------
def test_yaml_base_and_overrides(tmp_path):
    (tmp_path / "ds").mkdir()
    _write(tmp_path / "ds" / "z.json", "{}")
    _write(tmp_path / "base.yaml", "optim:\n  lr: 1.0e-3\n  betas: [0.9, 0.98]\ntrain:\n  epochs: 3\n"
                                   "  deepspeed_config: ds/z.json\nmodel:\n  layers: [1, 2]\n")
    recipe = _write(tmp_path / "r.yaml", "base: base.yaml\noptim:\n  weight_decay: 0.1\ntrain:\n  epochs: 7\n")
    cfg = load_config(recipe, ["optim.lr=1e-4", "model.layers=[4, 6]", "train.bf16=true", "train.clip_grad=null",
                               "model.model_kwargs.drop_path_rate=0.1", "data.batch_size=4"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)  # YAML reads 1e-4 as a string
    assert cfg.optim.betas == [0.9, 0.98] and cfg.optim.weight_decay == 0.1
    assert cfg.train.epochs == 7  # the recipe wins over its base
    assert cfg.train.bf16 is True and cfg.train.clip_grad is None
    assert cfg.model.layers == (4, 6) and cfg.model.model_kwargs == {"drop_path_rate": 0.1}
    assert cfg.data == {"batch_size": 4}
    # a path in a base file is relative to that file, not to the recipe or the cwd
    assert cfg.train.deepspeed_config == str((tmp_path / "ds" / "z.json").resolve())
    # the resolved config round-trips through YAML
    cfg.dump(tmp_path / "dumped.yaml")
    assert load_config(tmp_path / "dumped.yaml") == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'. Did you mean optim.lr?"),
        ("modle.layers=[1]", "unknown key 'modle'. Did you mean model?"),
        ("data.num_frame=8", "unknown key 'data.num_frame'. Did you mean data.num_frames?"),
        ("builtin_data.num_trian=8", "unknown key 'builtin_data.num_trian'. Did you mean builtin_data.num_train?"),
        ("train.epochs=abc", "train.epochs: expected int, got 'abc' (str)"),
        ("train.epochs=2.5", "train.epochs: expected int, got 2.5 (float)"),
        ("train.bf16=maybe", "train.bf16: expected bool, got 'maybe' (str)"),
        ("train.zero_stage=4", "train.zero_stage must be one of [0, 1, 2, 3], got 4"),
        ("optim.lr=-1", "optim.lr must be > 0, got -1.0"),
        ("optim.betas=[0.9]", "optim.betas must be two numbers in [0, 1), got [0.9]"),
        ("model.layers=[6, 4]", "model: layers must be sorted ascending, got [6, 4] (did you mean [4, 6]?)"),
        ("model.source=torchvision", "model.source must be one of ['timm', 'open_clip'], got 'torchvision'"),
        ("train.resume.x=1", "train.resume: expected str, got {'x': 1} (dict)"),
        ("model.mean_std=[[0.5, 0.5, 0.5], [0.2, 0, 0.2]]", "model.mean_std: every std must be > 0 (a clip is divided "
                                                            "by it), got [0.2, 0.0, 0.2]"),
        ("train.epochs", "overrides look like section.key=value"),
        ("epochs=3", "override keys are dotted section.key"),
    ],
)
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_recipe_errors(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(_write(tmp_path / "c.yaml", "train: 3\n"))
    with pytest.raises(ConfigError, match="builtin_data needs a 'root'"):
        load_config(None, ["builtin_data.num_train=4"])


def test_deepspeed_config_merges_json_with_recipe(tmp_path):
    json_path = _write(tmp_path / "z.json", json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True},
                                                        "train_micro_batch_size_per_gpu": "auto"}))
    train = TrainLoopConfig(deepspeed_config=str(json_path), clip_grad=0.5)
    ds = deepspeed_config(train, micro_batch=4, grad_accum=3)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": False}
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}  # the JSON's stage when YAML says null
    assert deepspeed_config(TrainLoopConfig(deepspeed_config=str(json_path), zero_stage=3), 4, 1)[
        "zero_optimization"]["stage"] == 3
    assert deepspeed_config(TrainLoopConfig(), 2, 1)["zero_optimization"] == {"stage": 0}
    _write(json_path, json.dumps({"train_batch_size": 64}))
    with pytest.raises(ConfigError, match="sets train_batch_size=64; batch sizes and clipping come from the recipe"):
        deepspeed_config(train, 4, 1)
    _write(json_path, json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="defines 'optimizer'"):
        deepspeed_config(train, 4, 1)


# -- backbone building and local weights ------------------------------------------------------------
def _tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(name="vit_base_patch16_clip_224", model_kwargs=dict(TINY_KW), num_classes=5, **kw)


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "torch_wrapped_ddp"])
def test_local_checkpoint_loads_into_timm_model(tmp_path, fmt):
    torch.manual_seed(0)
    source, _ = create_backbone(_tiny_cfg(), 5)
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "safetensors":
        save_file(sd, str(path))
    elif fmt == "torch":
        torch.save(sd, path)
    else:  # {'state_dict': {'module.xxx': ...}} as DDP training scripts write it
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    torch.manual_seed(1)
    loaded, _ = create_backbone(_tiny_cfg(checkpoint=str(path)), 5)
    fresh, _ = create_backbone(_tiny_cfg(), 5)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert not torch.equal(fresh.state_dict()["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])


def test_local_checkpoint_other_class_count_and_refusals(tmp_path, caplog):
    source, _ = create_backbone(_tiny_cfg(), 5)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    cfg = ModelConfig(name="vit_base_patch16_clip_224", model_kwargs=dict(TINY_KW), num_classes=7, checkpoint=str(path))
    with caplog.at_level(logging.WARNING):
        loaded, _ = create_backbone(cfg, 7)
    assert "not loading head.weight" in caplog.text
    assert torch.equal(loaded.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)
    assert loaded.head.weight.shape == (7, 32)
    # another architecture: no key matches
    bad = tmp_path / "other.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(ValueError, match="no tensor of .* matches VisionTransformer"):
        create_backbone(_tiny_cfg(checkpoint=str(bad)), 5)
    # missing backbone tensors
    partial = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items() if "blocks.3" not in k}, str(partial))
    with pytest.raises(ValueError, match="lacks .* backbone tensors"):
        create_backbone(_tiny_cfg(checkpoint=str(partial)), 5)
    # a pickled object is refused by weights_only=True
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": source.state_dict(), "config": ModelConfig()}, pickled)
    with pytest.raises(ValueError, match="weights_only=True"):
        create_backbone(_tiny_cfg(checkpoint=str(pickled)), 5)
    with pytest.raises(FileNotFoundError, match="no such file"):
        create_backbone(_tiny_cfg(checkpoint=str(tmp_path / "nope.pt")), 5)


def test_openclip_checkpoint_converts_into_timm_vit(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    clip = open_clip.create_model(
        "ViT-B-16", pretrained=None, embed_dim=16,
        vision_cfg={"width": 32, "layers": 4, "head_width": 16, "patch_size": 8, "image_size": 32},
        text_cfg={"width": 32, "layers": 1, "heads": 2, "context_length": 8, "vocab_size": 100}).eval()
    path = tmp_path / "open_clip.pt"
    torch.save(clip.state_dict(), path)
    vit, _ = create_backbone(_tiny_cfg(checkpoint=str(path)), 5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = vit.eval().forward_head(vit.forward_features(x), pre_logits=True)
        torch.testing.assert_close(feats @ clip.visual.proj, clip.visual(x), atol=1e-5, rtol=1e-5)


def test_openclip_backbone_with_head_and_local_checkpoint(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    kwargs = {"embed_dim": 16, "vision_cfg": {"width": 32, "layers": 3, "head_width": 16, "patch_size": 8,
                                              "image_size": 32},
              "text_cfg": {"width": 32, "layers": 1, "heads": 2, "context_length": 8, "vocab_size": 100}}
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None, **kwargs)
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))  # the whole CLIP model
    cfg = ModelConfig(source="open_clip", name="ViT-B-16", model_kwargs=kwargs, checkpoint=str(path), num_classes=5,
                      layers=[1])
    torch.manual_seed(1)
    model, mean_std = build_model(cfg, 5)
    for k, v in clip.visual.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    assert isinstance(model.head, torch.nn.Linear) and model.head.weight.shape == (5, 16)
    assert model(torch.randn(2, 3, 4, 32, 32)).shape == (2, 5)
    assert mean_std[0] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    with pytest.raises(ConfigError, match="is a tag"):
        create_backbone(ModelConfig(source="open_clip", name="ViT-B-16", pretrained=True), 5)
    with pytest.raises(ConfigError, match="must be true/false for timm"):
        create_backbone(ModelConfig(pretrained="openai"), 5)


def test_build_model_lora_temporal_and_mean_std():
    pytest.importorskip("peft")
    model, mean_std = build_model(_tiny_cfg(layers=[1, 2], lora={"r": 2}), 5)  # target_modules: the host's
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("compressors.") or ".head." in n for n in trainable)
    lora = [n for n in trainable if "lora_" in n]
    assert len(lora) == 2 * 4 and all(".attn.qkv.lora_" in n for n in lora)  # A, B on every block's qkv
    assert any(n.startswith("compressors.") for n in trainable) and any(".head." in n for n in trainable)
    assert mean_std[0] == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # CLIP, from timm's pretrained cfg
    with pytest.raises(ConfigError, match="model.lora: .*unexpected keyword argument 'rank'"):
        build_model(_tiny_cfg(lora={"rank": 2}), 5)
    # the preset's global module has 12 heads: a width of 48 divides
    cfg = ModelConfig(name="vit_base_patch16_clip_224", model_kwargs={**TINY_KW, "embed_dim": 48}, num_classes=5,
                      mean_std="imagenet", temporal="uniformerv2_b")
    model, mean_std = build_model(cfg, 5)
    assert mean_std[0] == (0.485, 0.456, 0.406) and len(model.temporal) > 0
    assert model(torch.randn(1, 3, 4, 32, 32)).shape == (1, 5)
    assert model.config.temporal == tuple(PRESETS["uniformerv2_b"])  # the preset, resolved by the model
    assert ModelConfig(temporal=[{"name": "temporal_shift", "blocks": "all"}]).temporal == (
        {"name": "temporal_shift", "blocks": "all"},)
    with pytest.raises(ConfigError, match="unknown preset 'uniformerv9'"):
        ModelConfig(temporal="uniformerv9")


# -- optimizer groups and schedule ---------------------------------------------------------------
def test_param_groups_weight_decay_and_layer_decay():
    model, _ = build_model(_tiny_cfg(layers=[1]), 5)
    groups = param_groups(model, OptimConfig(lr=1.0, weight_decay=0.05, layer_decay=0.5))
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    depth = 4
    assert scale["backbone.patch_embed.proj.weight"] == 0.5 ** (depth + 1)
    assert scale["backbone.cls_token"] == 0.5 ** (depth + 1)
    for i in range(depth):
        assert scale[f"backbone.blocks.{i}.attn.qkv.weight"] == 0.5 ** (depth - i)
    assert scale["backbone.head.weight"] == 1.0 and scale["backbone.norm.weight"] == 1.0
    assert all(s == 1.0 for n, s in scale.items() if n.startswith("compressors."))
    assert decay["backbone.blocks.0.attn.qkv.weight"] == 0.05
    for name in ("backbone.blocks.0.attn.qkv.bias", "backbone.blocks.0.norm1.weight", "backbone.cls_token",
                 "backbone.pos_embed", "compressors.1.time_embed", "compressors.1.alpha"):
        assert decay[name] == 0.0, name
    assert all(g["lr"] == g["lr_scale"] for g in groups)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    # no layer decay: one scale
    assert {g["lr_scale"] for g in param_groups(model, OptimConfig(lr=1.0))} == {1.0}


def test_param_groups_added_lr_scale():
    model, _ = build_model(_tiny_cfg(layers=[1], temporal=[{"name": "local_mhra", "blocks": [2]}]), 5)
    groups = param_groups(model, OptimConfig(lr=2.0, layer_decay=0.5, added_lr_scale=10.0))
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    added = [n for n in scale if n.startswith(("compressors.", "temporal."))]
    assert any(n.startswith("compressors.") for n in added) and any(n.startswith("temporal.") for n in added)
    assert all(scale[n] == 10.0 for n in added)  # added modules sit above the blocks: decay factor 1
    assert scale["backbone.head.weight"] == 1.0 and scale["backbone.blocks.3.mlp.fc1.weight"] == 0.5
    assert all(g["lr"] == 2.0 * g["lr_scale"] for g in groups)
    # a group never mixes added and backbone parameters, and the scale reaches the optimizer
    for g in groups:
        assert len({n.startswith(("compressors.", "temporal.")) for n in g["names"]}) == 1
    opt = build_optimizer(model, OptimConfig(lr=2.0, added_lr_scale=10.0))
    lr_of = {id(p): grp["lr"] for grp in opt.param_groups for p in grp["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named[added[0]])] == 20.0 and lr_of[id(named["backbone.head.weight"])] == 2.0
    with pytest.raises(ConfigError, match="added_lr_scale must be > 0, got 0"):
        OptimConfig(added_lr_scale=0)


def test_warmup_cosine_schedule():
    f = WarmupCosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    with pytest.raises(ConfigError, match=r"warm-up of 10 steps \(optim.warmup_epochs=2.0 x 5 steps per epoch\)"):
        build_scheduler(optimizer, OptimConfig(warmup_epochs=2.0), steps_per_epoch=5, total_steps=10)
    sched = build_scheduler(optimizer, OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.0), steps_per_epoch=5,
                            total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
