"""save_pretrained -> load_pretrained round trips, file layout, and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IMG, make_vit
from safetensors.torch import load_file

import inti_adapters as ia


def _perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_round_trip_frozen_backbone_saves_only_adapter_and_head(tmp_path):
    model = _perturbed(ia.inject(make_vit(), layers=[1, 2], freeze_backbone=True, fusion="add")).eval()
    video = torch.randn(2, 3, 4, IMG, IMG)
    with torch.no_grad():
        ref = model(video)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_model.safetensors", "inti_config.json"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.startswith(("compressors.1.", "compressors.2.", "backbone.head.")) for k in tensors)
    assert {"backbone.head.weight", "backbone.head.bias"} <= set(tensors)
    n_adapter = sum(p.numel() for p in model.compressors.parameters()) + sum(
        p.numel() for p in model.backbone.head.parameters())
    assert sum(t.numel() for t in tensors.values()) == n_adapter

    cfg = json.loads((tmp_path / "inti_config.json").read_text())
    assert cfg["inti_adapters_version"] == ia.__version__
    assert cfg["inject"]["layers"] == [1, 2] and cfg["inject"]["compressor_config"]["fusion"] == "add"
    assert list(cfg) == sorted(cfg)

    loaded = ia.load_pretrained(make_vit(), tmp_path).eval()  # same seed: same frozen backbone
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(video), ref)


def test_round_trip_full_fine_tune_saves_backbone_too(tmp_path):
    model = _perturbed(ia.inject(make_vit(), layers=[1])).eval()  # default: everything trains
    video = torch.randn(2, 3, 2, IMG, IMG)
    with torch.no_grad():
        ref = model(video)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "backbone_model.safetensors").exists()
    loaded = ia.load_pretrained(make_vit(seed=5), tmp_path).eval()  # different init: weights must come from disk
    with torch.no_grad():
        assert torch.equal(loaded(video), ref)
    # an adapter-only save removes a stale backbone file rather than leaving it to mislead the loader
    model.save_pretrained(tmp_path, save_backbone=False)
    assert not (tmp_path / "backbone_model.safetensors").exists()


def test_custom_head_round_trip_and_inference_only_loading(tmp_path):
    head = torch.nn.Linear(32, 3)
    model = _perturbed(ia.inject(make_vit(num_classes=0), layers=[2], head=head, freeze_backbone=True)).eval()
    video = torch.randn(1, 3, 4, IMG, IMG)
    with torch.no_grad():
        ref = model(video)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="custom head"):
        ia.load_pretrained(make_vit(num_classes=0), tmp_path)
    loaded = ia.load_pretrained(make_vit(num_classes=0), tmp_path, head=torch.nn.Linear(32, 3), is_trainable=False)
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded.eval()(video), ref)


def test_loading_into_a_different_architecture_is_refused(tmp_path):
    ia.inject(make_vit(), layers=[1], freeze_backbone=True).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"width 32 and depth 4.*got width 48 and depth 4"):
        ia.load_pretrained(make_vit(embed_dim=48), tmp_path)
    with pytest.raises(FileNotFoundError, match="inti_config.json"):
        ia.load_pretrained(make_vit(), tmp_path / "nowhere")


def test_newer_format_and_unknown_keys_warn(tmp_path):
    model = ia.inject(make_vit(), layers=[1], freeze_backbone=True)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "inti_config.json").read_text())
    cfg["format_version"] = 99
    cfg["inject"]["some_future_option"] = True
    (tmp_path / "inti_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning) as rec:
        ia.load_pretrained(make_vit(), tmp_path)
    text = " ".join(str(w.message) for w in rec)
    assert "format 99" in text and "some_future_option" in text


def test_failed_save_leaves_previous_files_intact(tmp_path, monkeypatch):
    model = ia.inject(make_vit(), layers=[1], freeze_backbone=True)
    model.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    import inti_adapters._format as ser

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ser, "save_file", boom)
    _perturbed(model)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_model.safetensors", "inti_config.json"]


def test_adapters_saved_with_the_old_head_names_still_load(tmp_path):
    """Before 0.2 the weight predictor was ``head`` (option and parameters): such adapters load."""
    from safetensors.torch import save_file

    model = _perturbed(ia.inject(make_vit(), layers=[1], freeze_backbone=True, weight_head="sigmoid")).eval()
    video = torch.randn(1, 3, 4, IMG, IMG)
    with torch.no_grad():
        ref = model(video)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "inti_config.json").read_text())
    cfg["inject"]["compressor_config"]["head"] = cfg["inject"]["compressor_config"].pop("weight_head")
    (tmp_path / "inti_config.json").write_text(json.dumps(cfg))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    old = {k.replace(".predictor.", ".head."): v for k, v in tensors.items()}
    assert any(".head." in k and k.startswith("compressors.") for k in old)
    save_file(old, tmp_path / "adapter_model.safetensors")
    with pytest.warns(DeprecationWarning, match="weight_head"):
        loaded = ia.load_pretrained(make_vit(), tmp_path).eval()
    assert loaded.config.compressor_config["weight_head"] == "sigmoid"
    with torch.no_grad():
        torch.testing.assert_close(loaded(video), ref, rtol=0, atol=0)
