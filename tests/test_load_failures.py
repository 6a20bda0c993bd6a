"""A failed ``load_pretrained`` leaves the caller's backbone exactly as it was; saving an unloaded
model is refused and never replaces a good adapter (issue 13, items 3 and 4)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IMG, make_vit

import inti_adapters as ia


def _snapshot(vit: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    return ({k: v.clone() for k, v in vit.state_dict().items()},
            {n: p.requires_grad for n, p in vit.named_parameters()})


def _assert_untouched(vit: torch.nn.Module, snap: tuple[dict[str, torch.Tensor], dict[str, bool]]) -> None:
    weights, flags = snap
    now = vit.state_dict()
    assert set(now) == set(weights)
    changed = [k for k in weights if not torch.equal(now[k], weights[k])]
    assert not changed, f"tensors changed by a failed load: {changed[:5]}"
    assert {n: p.requires_grad for n, p in vit.named_parameters()} == flags
    assert all("forward" not in m.__dict__ for m in vit.modules()), "an override was left behind"
    vit(torch.randn(1, 3, IMG, IMG))  # callable as an image model (no BareBackboneCallError)
    ia.inject(vit, layers=[1]).unload()  # and injectable again


@pytest.fixture
def full_finetune_save(tmp_path):
    """An adapter saved with the backbone (full fine-tuning): patch size 8."""
    model = ia.inject(make_vit(seed=1), layers=[1, 2])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path / "saved")
    return tmp_path / "saved"


def test_loading_into_another_patch_size_changes_nothing(full_finetune_save):
    vit = make_vit(patch_size=4)  # same width and depth, another patch grid: 43 tensors, 2 differ
    snap = _snapshot(vit)
    with pytest.raises(ValueError, match=r"differ in shape.*pos_embed|patch_embed"):
        ia.load_pretrained(vit, full_finetune_save)
    _assert_untouched(vit, snap)


def test_truncated_adapter_file_is_named_and_changes_nothing(full_finetune_save):
    f = full_finetune_save / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    vit = make_vit()
    snap = _snapshot(vit)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*truncated or damaged"):
        ia.load_pretrained(vit, full_finetune_save)
    _assert_untouched(vit, snap)


def test_missing_backbone_file_is_named_and_changes_nothing(full_finetune_save):
    (full_finetune_save / "backbone_model.safetensors").unlink()
    vit = make_vit()
    snap = _snapshot(vit)
    with pytest.raises(FileNotFoundError, match=r"backbone_model\.safetensors is missing"):
        ia.load_pretrained(vit, full_finetune_save)
    _assert_untouched(vit, snap)


def test_truncated_config_is_named(full_finetune_save):
    cfg = full_finetune_save / "inti_config.json"
    cfg.write_text(cfg.read_text()[:40])
    vit = make_vit()
    snap = _snapshot(vit)
    with pytest.raises(ValueError, match=r"inti_config\.json is not valid JSON"):
        ia.load_pretrained(vit, full_finetune_save)
    _assert_untouched(vit, snap)


def test_tampered_tensor_shape_changes_nothing(tmp_path):
    model = ia.inject(make_vit(), layers=[1], freeze_backbone=True)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("time_embed"))
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    vit = make_vit()
    snap = _snapshot(vit)
    with pytest.raises(ValueError, match="time_embed"):
        ia.load_pretrained(vit, tmp_path)
    _assert_untouched(vit, snap)


def test_save_after_unload_is_refused_and_keeps_the_good_adapter(tmp_path):
    model = ia.inject(make_vit(), layers=[1, 2], freeze_backbone=True)
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model.unload()
    with pytest.raises(RuntimeError, match="unloaded"):
        model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="unloaded"):
        ia.save_pretrained(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert json.loads((tmp_path / "inti_config.json").read_text())["inject"]["layers"] == [1, 2]
