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


# -- issue 23 items 4 and 5: a saved folder names only files inside it, each file only its own keys ----
def _edit_config(folder, **changes):
    cfg = json.loads((folder / "inti_config.json").read_text())
    for key, value in changes.items():
        cfg[key] = value
    (folder / "inti_config.json").write_text(json.dumps(cfg))


@pytest.fixture
def lora_save(tmp_path):
    """An adapter saved with a peft part (LoRA after inject), and a copy of its peft part outside it."""
    peft = pytest.importorskip("peft")
    import shutil

    model = ia.add_lora(ia.inject(make_vit(), layers=[1]), peft.LoraConfig(r=2, target_modules=["qkv"]))
    model.save_pretrained(tmp_path / "saved")
    shutil.copytree(tmp_path / "saved" / "peft", tmp_path / "elsewhere")
    return tmp_path / "saved"


@pytest.mark.parametrize("subfolder", ["ABS", "../elsewhere", "peft/../../elsewhere", "link"])
def test_a_peft_subfolder_outside_the_saved_folder_is_refused(lora_save, subfolder):
    outside = lora_save.parent / "elsewhere"
    if subfolder == "ABS":
        subfolder = str(outside)
    if subfolder == "link":
        (lora_save / "link").symlink_to(outside, target_is_directory=True)
    _edit_config(lora_save, peft={"order": "after_inject", "subfolder": subfolder})
    vit = make_vit()
    snap = _snapshot(vit)
    with pytest.raises(ValueError, match=r"peft\.subfolder .* points outside the saved folder"):
        ia.load_pretrained(vit, lora_save)
    _assert_untouched(vit, snap)


def test_an_adapter_file_with_a_backbone_key_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    model = ia.inject(make_vit(), layers=[1], freeze_backbone=True)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "inti_config.json").read_text())["saved_backbone"] is False
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["backbone.cls_token"] = torch.full_like(make_vit().cls_token, 7.0)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    vit = make_vit()
    snap = _snapshot(vit)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors holds 'backbone\.cls_token'.*refused"):
        ia.load_pretrained(vit, tmp_path)
    _assert_untouched(vit, snap)


def test_a_peft_file_with_a_backbone_key_is_refused_naming_it(lora_save):
    from safetensors.torch import load_file, save_file

    f = lora_save / "peft" / "adapter_model.safetensors"
    tensors = load_file(f)
    tensors["base_model.model.backbone.cls_token"] = torch.full_like(make_vit().cls_token, 7.0)
    save_file(tensors, f)
    vit = make_vit()
    snap = _snapshot(vit)
    with pytest.raises(ValueError, match=r"holds 'base_model\.model\.backbone\.cls_token', which is not a weight of its peft"):
        ia.load_pretrained(vit, lora_save)
    _assert_untouched(vit, snap)


# -- issue 23: inti_config.json with values of the wrong type, too deep, or the file given for the folder ---
@pytest.mark.parametrize("key, value, expected", [
    ("embed_dim", "32", r"embed_dim is '32' \(str\); expected an integer"),
    ("depth", 4.0, r"depth is 4\.0 \(float\); expected an integer"),
    ("format_version", "1", r"format_version is '1' \(str\); expected an integer"),
    ("saved_backbone", "false", r"saved_backbone is 'false' \(str\); expected true or false"),
    ("peft", ["x"], r"peft is \['x'\] \(list\); expected a JSON object or null"),
    ("inject", {"layers": "1,2"}, r"'inject' options are not valid"),
])
def test_config_values_of_the_wrong_type_are_named(tmp_path, key, value, expected):
    ia.inject(make_vit(), layers=[1], freeze_backbone=True).save_pretrained(tmp_path)
    _edit_config(tmp_path, **{key: value})
    vit = make_vit()
    snap = _snapshot(vit)
    with pytest.raises(ValueError, match=r"inti_config\.json.*" + expected):
        ia.load_pretrained(vit, tmp_path)
    _assert_untouched(vit, snap)


def test_a_deeply_nested_config_is_refused_with_the_file_named(tmp_path):
    ia.inject(make_vit(), layers=[1], freeze_backbone=True).save_pretrained(tmp_path)
    (tmp_path / "inti_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"inti_config\.json is nested too deeply"):
        ia.load_pretrained(make_vit(), tmp_path)


def test_the_config_file_given_instead_of_its_folder_is_named(tmp_path):
    ia.inject(make_vit(), layers=[1], freeze_backbone=True).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"inti_config\.json is a file; load_pretrained takes the folder .*"
                                         + str(tmp_path)):
        ia.load_pretrained(make_vit(), tmp_path / "inti_config.json")
