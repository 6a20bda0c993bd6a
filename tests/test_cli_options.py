"""The command lines as a new user meets them (issue 24): smoke runs beside the real output folder,
options and overrides in any order, offline evaluation / export of a checkpoint that carries its
backbone, a failed download in one line, ``| head -1`` without a traceback."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

import inti_adapters as ia
from inti_adapters.train import export_cli
from inti_adapters.train.cli import _eval_model, eval_main, train_main
from inti_adapters.train.config import load_config
from inti_adapters.train.runlock import RunLock

ROOT = Path(__file__).resolve().parents[1]
DIGITS_VIT = dict(img_size=64, patch_size=8, depth=4, embed_dim=64, num_heads=4, class_token=True, global_pool="token")


# -- item 2: --smoke never touches the recipe's real output folder ------------------------------------------
def test_a_smoke_run_writes_beside_the_real_output_folder_never_into_it(tmp_path, capsys):
    real = tmp_path / "runs" / "digits_cpu"
    real.mkdir(parents=True)
    (real / "keep.txt").write_text("the real run's")
    assert train_main(["--config", "digits_cpu", "--smoke", f"train.output_dir={real}"]) == 0
    assert sorted(p.name for p in real.iterdir()) == ["keep.txt"] and (real / "keep.txt").read_text() == "the real run's"
    smoke = tmp_path / "runs" / "digits_cpu.smoke"
    assert (smoke / "final" / "inti_config.json").is_file()
    assert f"adapter saved to {smoke / 'final'}" in capsys.readouterr().out


# -- item 3: options and key=value overrides in any order -------------------------------------------------
@pytest.mark.parametrize("main", [train_main, eval_main], ids=["inti-train", "inti-eval"])
def test_overrides_after_other_options(main, capsys):
    assert main(["--config", "digits_cpu", "model.pretrained=false", "--print-config", "optim.lr=0.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.5 and printed["model"]["pretrained"] is False


def test_inti_export_overrides_between_options(tmp_path, monkeypatch):
    seen = {}

    def recording_load(config, overrides):
        seen["overrides"] = list(overrides)
        raise export_cli.ConfigError("stop here")

    monkeypatch.setattr(export_cli, "load_config", recording_load)
    with pytest.raises(SystemExit) as e:
        export_cli.export_main(["--config", "digits_cpu", "model.num_classes=5", "--checkpoint", str(tmp_path),
                                "data.num_frames=4", "--out", str(tmp_path / "m.pt2"), "optim.lr=1"])
    assert e.value.code == 2 and seen["overrides"] == ["model.num_classes=5", "data.num_frames=4", "optim.lr=1"]


# -- item 5: --help-config lists every data key, --print-config shows the data defaults -----------------------
def test_help_config_lists_every_data_and_builtin_data_key_with_its_help(capsys):
    import dataclasses

    from inti_adapters.data import DataConfig, DigitsOptions

    with pytest.raises(SystemExit) as e:
        train_main(["--help-config"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    data = text.split("\ndata:", 1)[1].split("\nbuiltin_data:", 1)
    for f in dataclasses.fields(DataConfig):
        assert f"\n  {f.name} (" in data[0] and f.metadata["help"] in data[0], f.name
    for name in ["root", "workers", *(f.name for f in dataclasses.fields(DigitsOptions))]:
        assert f"\n  {name} (" in data[1], name


def test_print_config_shows_every_data_default(capsys):
    import dataclasses

    from inti_adapters.data import DataConfig

    assert train_main(["--config", "digits_cpu", "--print-config", "data.hflip=true"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert set(data) == {f.name for f in dataclasses.fields(DataConfig)}
    assert data["hflip"] is True and data["on_incomplete"] == "raise" and data["decode_device"] == "cpu"
    assert data["crop_size"] == 64 and data["batch_size"] == 16  # the recipe's values win over the defaults


# -- item 4: a checkpoint that carries its backbone is evaluated / exported without the network --------------
@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1, an empty Hub cache, and every connect to a non-loopback address refused (and recorded)."""
    hf = pytest.importorskip("huggingface_hub")
    attempts: list[object] = []
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else None
        try:
            remote = host is not None and not ipaddress.ip_address(host).is_loopback
        except ValueError:  # a name, not an address: resolving it is already an attempt
            remote = host not in ("localhost",)
        if remote:
            attempts.append(address)
            raise OSError(f"test: network access to {address} refused")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    return attempts


def _digits_vit(num_classes: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **DIGITS_VIT)


@pytest.fixture
def fine_tuned(tmp_path):
    """A fully fine-tuned digits_cpu-shaped model saved with its backbone, and a video to compare on."""
    model = ia.inject(_digits_vit(), layers=[1, 2]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path / "final")
    assert (tmp_path / "final" / "backbone_model.safetensors").is_file()
    return model, tmp_path / "final"


PRETRAINED = ["model.pretrained=true", "model.num_classes=5"]  # what a K400 recipe asks for: downloaded weights


def test_eval_model_of_a_fine_tuned_checkpoint_downloads_nothing(fine_tuned, no_network):
    model, folder = fine_tuned
    cfg = load_config("digits_cpu", PRETRAINED)
    loaded, mean_std = _eval_model(cfg, 5, str(folder), smoke=False)
    video = torch.randn(1, 3, 4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(video), model(video), rtol=0, atol=0)
    assert no_network == [] and len(mean_std) == 2


def test_export_of_a_fine_tuned_checkpoint_downloads_nothing(fine_tuned, no_network, tmp_path, capsys):
    _, folder = fine_tuned
    out = tmp_path / "m.pt2"
    assert export_cli.export_main(["--config", "digits_cpu", *PRETRAINED, "--checkpoint", str(folder),
                                   "data.num_frames=4", "--out", str(out)]) == 0
    assert out.is_file() and "checked against the eager model" in capsys.readouterr().out
    assert no_network == []


def test_a_needed_download_that_fails_is_one_line_saying_how_to_use_local_weights(tmp_path, no_network, capsys):
    ia.inject(_digits_vit(), layers=[1, 2], freeze_backbone=True).save_pretrained(tmp_path / "adapter")
    with pytest.raises(SystemExit) as e:
        export_cli.export_main(["--config", "digits_cpu", *PRETRAINED, "--checkpoint", str(tmp_path / "adapter"),
                                "--out", str(tmp_path / "m.pt2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1, err
    assert err[0].startswith("inti-export: error: could not fetch the pretrained weights of timm model "
                             "'vit_tiny_patch16_224' (model.pretrained=True) (HF_HUB_OFFLINE is set)")
    assert "model.checkpoint" in err[0] and not (tmp_path / "m.pt2").exists()


# -- item 10: a reader that stops early ends the command quietly with status 0 ----------------------------
def test_a_closed_pipe_ends_quietly_with_status_0():
    code = "import sys; from inti_adapters.train.cli import train_main; sys.exit(train_main())"
    commands = [["--list-recipes"], ["--help-config"], ["--config", "digits_cpu", "--print-config"]]
    procs = [subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=ROOT) for args in commands]  # side by side: each spends seconds importing
    for proc in procs:
        proc.stdout.close()  # the reader is gone before the command writes (as `| head -1` after its line)
    for args, proc in zip(commands, procs, strict=True):
        try:
            _, err = proc.communicate(timeout=180)
        finally:
            proc.kill()
        assert proc.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, (args, err.decode()[-2000:])


# -- also seen: a damaged shard in inti-eval is one line, not a traceback -----------------------------------
def test_a_damaged_shard_in_inti_eval_is_one_line(tmp_path, capsys):
    from inti_adapters.data import ensure_builtin_dataset

    root = tmp_path / "digits"
    options = dict(num_train=4, num_val=4, samples_per_shard=2, store="frames")
    ensure_builtin_dataset(root, **options)
    shard = sorted((root / "val").glob("*.tar"))[-1]
    data = bytearray(shard.read_bytes())
    data[600:len(data) // 2] = bytes(b ^ 0x5A for b in data[600:len(data) // 2])  # a damaged member header
    shard.write_bytes(bytes(data))
    folder = tmp_path / "final"
    ia.inject(_digits_vit(40), layers=[1, 2]).save_pretrained(folder)  # 40 classes, as the data set
    args = ["--config", "digits_cpu", "--checkpoint", str(folder), f"builtin_data.root={root}",
            *(f"builtin_data.{k}={v}" for k, v in options.items()), "data.num_workers=0", "data.num_frames=4"]
    with pytest.raises(SystemExit) as e:
        eval_main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if "inti-eval" in line or "Traceback" in line]
    assert e.value.code == 1 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("inti-eval: error: evaluation read ") and "sizes.json lists 4" in err[0]


def test_inti_train_with_pretrained_weights_it_cannot_fetch_is_one_line(tmp_path, no_network, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["--config", "digits_cpu", *PRETRAINED, f"train.output_dir={tmp_path / 'run'}",
                    f"builtin_data.root={tmp_path / 'digits'}", "builtin_data.num_train=4", "builtin_data.num_val=4",
                    "builtin_data.samples_per_shard=2", "builtin_data.store=frames", "data.num_workers=0",
                    "data.batch_size=2"])
    err = [line for line in capsys.readouterr().err.splitlines() if "inti-train" in line or "Traceback" in line]
    assert e.value.code == 1 and len(err) == 1, err
    assert err[0].startswith("inti-train: error: could not fetch the pretrained weights of timm model")
    assert no_network == []  # offline: refused before any connection


# -- what a run can end in (issues 23, 25): one line and status 1, no traceback ------------------------------
def test_a_run_refused_by_a_live_runs_lock_is_one_line(tmp_path, capsys):
    real = tmp_path / "runs" / "digits_cpu"
    with RunLock(Path(f"{real}.smoke")), pytest.raises(SystemExit) as e:  # another run holds the smoke folder
        train_main(["--config", "digits_cpu", "--smoke", f"train.output_dir={real}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert err.startswith("inti-train: error: ") and err.count("\n") == 1
    assert f"{real}.smoke is in use by another run (pid {os.getpid()} on host {socket.gethostname()}" in err
