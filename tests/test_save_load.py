"""save_pretrained -> load_pretrained round trips, file layout, and refusals."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

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


# -- issue 24 item 7: written files honour the umask (mkstemp's temporaries are 0600) -----------------------
@pytest.fixture
def umask():
    """Run with a given umask, restored afterwards."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _modes(folder):
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_saved_adapters_shards_and_manifests_honour_the_umask(tmp_path, umask, mask, mode):
    from inti_adapters.data.shards import ShardSink, write_json_atomic

    umask(mask)
    peft = pytest.importorskip("peft")
    ia.add_lora(ia.inject(make_vit(), layers=[1]), peft.LoraConfig(r=2, target_modules=["qkv"])).save_pretrained(
        tmp_path / "lora")
    ia.inject(make_vit(), layers=[1]).save_pretrained(tmp_path / "full")  # with backbone_model.safetensors
    modes = {**_modes(tmp_path / "lora"), **_modes(tmp_path / "full")}
    assert {"README.md", "inti_config.json", "adapter_model.safetensors", "backbone_model.safetensors",
            "peft/adapter_model.safetensors"} <= set(modes)
    assert set(modes.values()) == {mode}, modes
    with ShardSink(tmp_path / "shard-000000.tar") as sink:  # what inti-shards writes through
        sink.commit()
    write_json_atomic(tmp_path / "sizes.json", {"shard-000000.tar": 0})
    assert stat.S_IMODE((tmp_path / "shard-000000.tar").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "sizes.json").stat().st_mode) == mode


def test_a_rewritten_file_keeps_its_mode(tmp_path, umask):
    from inti_adapters._io import atomic_write

    target = tmp_path / "README.md"
    target.write_text("mine")
    os.chmod(target, 0o640)
    atomic_write(target, "rewritten")
    atomic_write(tmp_path / "w.bin", lambda p: Path(p).write_bytes(b"x"))  # the writer-function path too
    assert target.read_text() == "rewritten" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "w.bin").stat().st_mode) == 0o644
