"""Every recipe loads, matches the paper's settings and runs one step (``--smoke``); the CPU recipe
trains and evaluates on real (tiny) built-in shards through ``inti-train`` / ``inti-eval``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inti_adapters.train import load_config
from inti_adapters.train.cli import eval_main, train_main
from inti_adapters.train.metrics import read_metrics

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:torch.distributed")

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL = sorted(RECIPES.glob("*.yaml"))
PAPER = sorted(p for p in ALL if p.name.startswith(("k400_", "ssv2_")))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_recipe_set_is_complete():
    names = {p.stem for p in PAPER}
    assert names == {f"{d}_{b}_{v}" for d in ("k400", "ssv2") for b in ("vitb16", "vitl14")
                     for v in ("naive", "inti", "inti_temporal")}
    assert (RECIPES / "digits_cpu.yaml").is_file()


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_recipes_hold_the_paper_settings(path):
    from inti_adapters.data import DataConfig

    cfg = load_config(path)
    data = DataConfig(**cfg.data)
    assert data.num_frames == 16 and data.crop_size == 224 and cfg.train.bf16
    big = "vitl14" in path.stem
    assert cfg.model.name == ("vit_large_patch14_clip_224.openai" if big else "vit_base_patch16_clip_224.openai")
    assert cfg.model.pretrained is True
    variant = path.stem.split("_", 2)[2]
    assert list(cfg.model.layers) == {"naive": [], "inti": [9, 13] if big else [4, 6],
                                      "inti_temporal": [9, 13] if big else [4, 6]}[variant]
    assert cfg.model.temporal == (("uniformerv2_l" if big else "uniformerv2_b") if variant == "inti_temporal" else ())
    if path.stem.startswith("k400"):
        assert cfg.model.num_classes == 400 and (data.num_clips, data.num_crops) == (4, 3)
        assert cfg.optim.lr == 2.2e-5 and cfg.train.global_batch_size == 512 and data.hflip
    else:
        assert cfg.model.num_classes == 174 and (data.num_clips, data.num_crops) == (1, 3) and not data.hflip
        assert cfg.train.global_batch_size == (128 if big else 64)
    assert Path(cfg.train.deepspeed_config).is_file()


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_every_recipe_runs_one_smoke_step(path, tmp_path, capsys):
    assert train_main(["--config", str(path), "--smoke", f"train.output_dir={tmp_path / 'run'}"]) == 0
    assert "inti-train: done at step 1" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()  # a smoke run writes beside the real output folder, never into it
    rows = read_metrics(tmp_path / "run.smoke" / "metrics.csv")
    assert [r["split"] for r in rows] == ["train", "val"] and rows[0]["loss"] > 0
    saved = json.loads((tmp_path / "run.smoke" / "final" / "inti_config.json").read_text())
    assert saved["inject"]["layers"] == list(load_config(path).model.layers)


def test_openclip_source_and_eval_smoke(tmp_path, capsys):
    pytest.importorskip("open_clip")
    recipe = str(RECIPES / "ssv2_vitb16_inti_temporal.yaml")
    swap = ["model.source=open_clip", "model.name=ViT-B-16", "model.pretrained=false"]
    assert train_main(["--config", recipe, "--smoke", f"train.output_dir={tmp_path / 'run'}", *swap]) == 0
    assert json.loads((tmp_path / "run.smoke" / "final" / "inti_config.json").read_text())["host"] == "open_clip"
    capsys.readouterr()
    assert eval_main(["--config", recipe, "--smoke", *swap]) == 0
    assert "(2 videos, views 4×1×3 frames×clips×crops" in capsys.readouterr().out  # SSv2: 1 clip x 3 crops


def test_zero3_json_with_lora_runs(tmp_path):
    from safetensors.torch import load_file

    recipe = RECIPES / "k400_vitb16_inti_temporal.yaml"
    assert train_main(["--config", str(recipe), "--smoke", f"train.output_dir={tmp_path}", "model.lora={r: 4}",
                       f"train.deepspeed_config={RECIPES / 'ds' / 'zero3.json'}"]) == 0
    tmp_path = tmp_path.with_name(tmp_path.name + ".smoke")  # where a smoke run writes
    saved = load_file(str(tmp_path / "final" / "peft" / "adapter_model.safetensors"))  # peft's own format
    lora = [k for k in saved if "lora_" in k]
    assert len(lora) == 2 * 12 and all(saved[k].numel() > 0 for k in lora)  # A and B of every block's qkv
    assert not (tmp_path / "final" / "backbone_model.safetensors").exists()  # the base weights stayed frozen


def test_cpu_recipe_on_builtin_shards_train_then_eval(tmp_path, capsys):
    pytest.importorskip("av")
    overrides = [f"builtin_data.root={tmp_path / 'digits'}", "builtin_data.num_train=24", "builtin_data.num_val=6",
                 f"train.output_dir={tmp_path / 'run'}", "train.epochs=1", "data.batch_size=4", "data.num_workers=0",
                 "optim.warmup_epochs=0", "train.progress=false"]
    recipe = str(RECIPES / "digits_cpu.yaml")
    assert train_main(["--config", recipe, *overrides]) == 0
    assert "val top-1" in capsys.readouterr().out
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r["step"] for r in rows if r["split"] == "train"][-1] == 6  # 24 clips / batch 4
    out = tmp_path / "eval.json"
    assert eval_main(["--config", recipe, *overrides, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["num_samples"] == 6 and result["num_views"] == 12 and result["views"] == "8×2×1"  # 2 clips x 1 crop
    assert 0 <= result["top1"] <= result["top5"] <= 100 and result["gflops_per_view"] > 0
    assert 0 <= result["mean_class_accuracy"] <= 100 and result["average_clips"] == "prob"
    assert "GFLOPs/view" in printed and "views 8×2×1 frames×clips×crops" in printed


def test_cli_errors_and_module_entry_point(tmp_path, capsys):
    recipe = str(RECIPES / "digits_cpu.yaml")
    with pytest.raises(SystemExit) as err:
        train_main(["--config", recipe, "optim.lrr=1"])
    assert err.value.code == 2 and "unknown key 'optim.lrr'. Did you mean optim.lr?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main([])
    assert "--config is required" in capsys.readouterr().err
    # python -m inti_adapters.train is what `deepspeed --module` / `torchrun -m` launch; the
    # deepspeed launcher appends --local_rank
    proc = subprocess.run([sys.executable, "-m", "inti_adapters.train", "--config", recipe, "--print-config",
                           "train.epochs=2", "--local_rank=0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "epochs: 2" in proc.stdout and "vit_tiny_patch16_224" in proc.stdout
