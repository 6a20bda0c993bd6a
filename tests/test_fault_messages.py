"""Bad inputs refused early, with messages that name the file or key and say what is expected
(issue 13, items 8 and 9): DeepSpeed JSON, data section, position tables, input dtypes, frame counts."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import make_vit

import inti_adapters as ia
from inti_adapters.train import load_config
from inti_adapters.train.build import load_backbone_weights
from inti_adapters.train.cli import train_main
from inti_adapters.train.config import ConfigError
from inti_adapters.train.engine import deepspeed_config

TINY_KW = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2, "depth": 2}


def _recipe(tmp_path, **sections) -> str:
    path = tmp_path / "recipe.yaml"
    base = {"model": {"name": "vit_base_patch16_clip_224", "model_kwargs": TINY_KW, "num_classes": 4},
            "train": {"output_dir": str(tmp_path / "run")}, **sections}
    path.write_text(json.dumps(base))  # JSON is YAML
    return str(path)


# -- item 8: the DeepSpeed JSON --------------------------------------------------------------------
def test_deepspeed_json_syntax_error_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n')
    cfg = load_config(None, [f"train.deepspeed_config={bad}"])
    with pytest.raises(ConfigError, match=r"train.deepspeed_config: .*ds.json is not valid JSON: .* line 2"):
        deepspeed_config(cfg.train, 2, 1)
    # --print-config reports it too, before anything starts
    with pytest.raises(SystemExit) as e:
        train_main(["--config", _recipe(tmp_path), f"train.deepspeed_config={bad}", "--print-config"])
    assert e.value.code == 2 and "ds.json is not valid JSON" in capsys.readouterr().err
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        deepspeed_config(cfg.train, 2, 1)


def test_deepspeed_universal_checkpoint_loading_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"checkpoint": {"load_universal": True}}))
    with pytest.raises(ConfigError, match="load_universal"):
        deepspeed_config(load_config(None, [f"train.deepspeed_config={path}"]).train, 2, 1)


# -- item 9: the data section is checked when the recipe is read ----------------------------------
@pytest.mark.parametrize("override, key", [
    ("data.num_frames=0", "num_frames"),
    ("data.sampling=random", "sampling"),
    ("data.num_crops=2", "num_crops"),
    ("data.batch_size=two", "batch_size"),
    ("data.train_shards=7", "train_shards"),
])
def test_bad_data_values_are_refused_when_the_recipe_is_read(override, key):
    with pytest.raises(ConfigError, match=rf"^data: .*{key}"):
        load_config(None, [override])


def test_bad_data_values_are_refused_by_print_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["--config", _recipe(tmp_path), "data.crop_size=-3", "--print-config"])
    assert e.value.code == 2
    assert "data: crop_size must be an int >= 1, got -3" in capsys.readouterr().err


def test_builtin_data_values_are_checked_with_the_data_section(tmp_path):
    with pytest.raises(ConfigError, match="builtin_data: .*image_size"):
        load_config(None, [f"builtin_data.root={tmp_path}", "builtin_data.image_size=0"])
    # the built-in set's frames decide short_side = crop_size = image_size: a data value that only clashes
    # with the generic defaults is fine, one that clashes with the built-in set's is not
    load_config(None, [f"builtin_data.root={tmp_path}", "builtin_data.image_size=64", "data.crop_size=64"])
    with pytest.raises(ConfigError, match="short_side"):
        load_config(None, [f"builtin_data.root={tmp_path}", "builtin_data.image_size=64", "data.crop_size=96"])


# -- item 8: a position table that cannot be resampled ----------------------------------------------
def test_unresamplable_position_table_names_the_file_and_the_expected_shape(tmp_path):
    model = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=4, **TINY_KW)
    sd = model.state_dict()
    sd["pos_embed"] = torch.randn(1, 1 + 82, 32)  # 82 patch positions: not a square grid
    path = tmp_path / "odd_grid.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError) as e:
        load_backbone_weights(model, path)
    msg = str(e.value)
    assert str(path) in msg and "pos_embed (1, 83, 32) (the model expects (1, 17, 32))" in msg
    sd["pos_embed"] = torch.randn(1, 1 + 36, 32)  # a 6x6 grid is resampled to 4x4
    torch.save(sd, path)
    load_backbone_weights(model, path)


# -- item 8: float inputs of another dtype than the weights ----------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_video_of_another_float_dtype_says_what_the_model_expects(dtype):
    model = ia.inject(make_vit(), layers=[1])
    video = torch.randn(1, 3, 4, 32, 32)
    with pytest.raises(TypeError, match=rf"weights are torch.float32 but the video is {dtype}: convert it with "
                                        r"video.to\(torch.float32\)"):
        model(video.to(dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision stays allowed
        assert model(video.to(torch.bfloat16)).shape == (1, 5)
    if dtype != torch.float64:  # a model converted to the video's dtype takes it
        assert model.to(dtype)(video.to(dtype)).dtype == dtype


# -- item 9: frame_schedule(0) ------------------------------------------------------------------------
@pytest.mark.parametrize("frames", [0, -2, 1.5, True])
def test_frame_schedule_refuses_non_positive_frame_counts(frames):
    model = ia.inject(make_vit(), layers=[1])
    with pytest.raises(ValueError, match="num_frames must be a positive int"):
        model.frame_schedule(frames)
    assert model.frame_schedule(4) == [4, 4, 2, 2]


# -- issue 23: recipes (item 2's recipe part, item 9, duplicate keys, base entries) ------------------
@pytest.mark.parametrize("override, key", [
    ("optim.lr=.inf", "optim.lr"), ("optim.lr=-.inf", "optim.lr"), ("optim.lr=.nan", "optim.lr"),
    ("optim.lr=inf", "optim.lr"), ("optim.weight_decay=nan", "optim.weight_decay"),
    ("model.model_kwargs={depth: 2, drop_rate: .nan}", "model.model_kwargs.drop_rate"),
    ("optim.betas=[0.9, .inf]", r"optim.betas\[1\]"),
])
def test_non_finite_recipe_numbers_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: got .*recipe numbers must be finite"):
        load_config(None, [override])


def test_non_finite_number_in_a_recipe_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("optim:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=rf"^{path}: optim.lr: got inf"):
        load_config(str(path))
    path.write_text("optim:\n  lr: 1.0e-3\n")
    assert load_config(str(path)).optim.lr == 1e-3


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    import time

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10**9 values once expanded
    path = tmp_path / "bomb.yaml"
    path.write_text("model:\n  model_kwargs:\n" + "".join(f"    {line}\n" for line in lines))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"(?s)^{path} is not valid YAML: its aliases expand to more than 100000 "
                                          rf"values .*alias bomb.*\"{path}\", line"):
        load_config(str(path))
    assert time.perf_counter() - start < 5
    with pytest.raises(ConfigError, match="alias bomb"):  # overrides too
        load_config(None, ["model.model_kwargs={" + ", ".join(lines) + "}"])
    # a few aliases stay allowed
    path.write_text("optim:\n  betas: &b [0.9, 0.99]\nmodel:\n  model_kwargs: {betas: *b}\n")
    assert load_config(str(path)).model.model_kwargs == {"betas": [0.9, 0.99]}
    path.write_text("model:\n  model_kwargs: &a {x: *a}\n")  # recursive
    with pytest.raises(ConfigError, match=f"^{path} is not valid YAML: .*recursive"):
        load_config(str(path))


def test_duplicate_yaml_keys_are_refused_naming_the_key_file_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\n  weight_decay: 0.05\n  lr: 1.0e-2\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path} is not valid YAML: duplicate key 'lr' (first given on line 2)")
    assert f'"{path}", line 4' in msg
    path.write_text("optim: {lr: 1.0e-3}\noptim: {weight_decay: 0.1}\n")  # sections too
    with pytest.raises(ConfigError, match="duplicate key 'optim'"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"override 'model.model_kwargs=\{depth: 2, depth: 3\}'.*duplicate key 'depth'"):
        load_config(None, ["model.model_kwargs={depth: 2, depth: 3}"])


@pytest.mark.parametrize("base, bad", [("[a.yaml, 5]", r"base\[1\] must be a recipe file name .*got 5 \(int\)"),
                                       ("{a: 1}", r"base must be a recipe file name or a list of them .*\(dict\)"),
                                       ("[a.yaml, null]", r"base\[1\] must be a recipe file name .*got None")])
def test_bad_base_entries_name_the_recipe(tmp_path, base, bad):
    (tmp_path / "a.yaml").write_text("optim:\n  lr: 1.0e-3\n")
    path = tmp_path / "child.yaml"
    path.write_text(f"base: {base}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: {bad}"):
        load_config(str(path))
    path.write_text("base: [a.yaml]\n")
    assert load_config(str(path)).optim.lr == 1e-3


# -- issue 23: an injected model pickles (the sites' functions were closures) --------------------------
@pytest.mark.parametrize("kw", [
    {"layers": [1]},
    {"layers": [0, 1], "compressor": "tome", "r": 1},
    {"layers": [1], "temporal": [{"name": "local_mhra", "blocks": "all"},
                                  {"name": "global_mhra", "blocks": {"last": 1}, "num_heads": 2}]},
    {"layers": [], "temporal": [{"name": "st_adapter", "blocks": "all", "placement": "mlp"}]},
])
def test_injected_model_pickles_and_works_after(kw):
    import pickle

    model = ia.inject(make_vit(), **kw).eval()
    video = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(video)
        with model.disable_adapters():
            bare = model(video)
    copy = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(copy(video), ref)
        with copy.disable_adapters():  # the copy's sites read the copy's own context holder
            assert torch.equal(copy(video), bare)
    copy.train()
    copy(video).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in copy.parameters())
    backbone = copy.unload()  # every override removed: the bare backbone again
    assert all("forward" not in m.__dict__ for m in backbone.modules())
