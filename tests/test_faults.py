"""Faults a careful user hits (issue 13): kill -9 and crashes in every window of training, checkpoint
saving and export, then resume, must reproduce the uninterrupted run; tampered checkpoints are
refused before any of their code runs; a resumed recipe is compared with the checkpoint's.

One real ``kill -9`` (a subprocess killed while it saves a checkpoint) runs in ``make test``; the
two-rank ``torchrun`` kill is marked slow.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_engine import Crash, factory  # the same synthetic run

from inti_adapters.train import SyntheticVideoLoader, Trainer, load_config
from inti_adapters.train import checkpoint as ckpt_module
from inti_adapters.train import engine as engine_module
from inti_adapters.train.checkpoint import (
    POINTER,
    CheckpointManager,
    UnsafeCheckpointError,
    safe_torch_load,
    verify_checkpoint,
)
from inti_adapters.train.config import ConfigError, compare_recipes
from inti_adapters.train.metrics import read_metrics

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:torch.distributed")

HERE = Path(__file__).resolve().parent
TINY_KW = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2, "depth": 4, "drop_path_rate": 0.1}
OVERRIDES = [
    "model.name=vit_base_patch16_clip_224", f"model.model_kwargs={json.dumps(TINY_KW)}", "model.layers=[1, 2]",
    "model.num_classes=4", "train.epochs=2", "train.grad_accum=2", "train.zero_stage=2", "train.progress=false",
    "train.tensorboard=false", "train.log_every=1", "train.eval_every_epochs=0", "optim.lr=3e-3",
    "optim.warmup_steps=2", "data.batch_size=2",
]


def make_cfg(out, *overrides):
    return load_config(None, [*OVERRIDES, f"train.output_dir={out}", *overrides])


class Recording(Trainer):
    """Keeps the printed epoch summaries."""

    def _epoch_summary(self, *args, **kwargs):
        line = super()._epoch_summary(*args, **kwargs)
        self.summaries = [*getattr(self, "summaries", []), line]
        return line


class CrashAt(Trainer):
    """Dies right after optimizer step 5, like a killed job (no final save)."""

    summaries_seen = 0

    def _epoch_summary(self, *args, **kwargs):
        self.summaries_seen += 1
        return super()._epoch_summary(*args, **kwargs)

    def on_step_end(self, step: int, loss: float) -> None:
        if step == 5:
            raise Crash(f"killed after step {step}")


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}


def assert_same_params(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)


def summary_loss(line: str) -> float:
    return float(line.split("loss ")[1].split()[0])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine; also what the subprocesses use
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: 8 steps (2 epochs x 4), no checkpoint."""
    out = tmp_path_factory.mktemp("reference")
    trainer = Recording(make_cfg(out, "train.save_every=0"), loader_factory=factory)
    trainer.fit()
    return {"params": params(trainer), "rows": read_metrics(out / "metrics.csv"), "summaries": trainer.summaries,
            "export": load_file(str(out / "final" / "adapter_model.safetensors"))}


KILL_SCRIPT = textwrap.dedent('''
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    import deepspeed.runtime.engine as ds_engine
    from test_faults import factory, make_cfg
    from inti_adapters.train import Trainer

    out, kill_tag = sys.argv[2], sys.argv[3]
    original = ds_engine.DeepSpeedEngine.save_checkpoint

    def save_then_die(self, save_dir, tag=None, **kw):
        original(self, save_dir, tag=tag, **kw)
        if tag == kill_tag:  # DeepSpeed's files are written; the RNG files, run.json and the pointer are not
            os.kill(os.getpid(), signal.SIGKILL)

    ds_engine.DeepSpeedEngine.save_checkpoint = save_then_die
    Trainer(make_cfg(out, "train.save_every=3"), loader_factory=factory).fit()
''')


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A run with save_every=3, killed with SIGKILL while saving step 6: the complete checkpoint is step 3."""
    out = tmp_path_factory.mktemp("killed")
    script = out / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(script), str(HERE), str(out), "step_00000006"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


# -- kill -9 and crash windows ------------------------------------------------------------------------
def test_kill_9_while_saving_then_resume_reproduces_the_run(killed, reference, tmp_path):
    out = copy_run(killed, tmp_path / "run")
    ckpts = out / "checkpoints"
    assert (ckpts / POINTER).read_text().strip() == "step_00000003"
    assert not (ckpts / "step_00000006" / "rng_rank0.pt").exists()
    trainer = Recording(make_cfg(out, "train.save_every=3"), loader_factory=factory)
    assert trainer.fit().step == 8
    assert_same_params(params(trainer), reference["params"])
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference["rows"]], abs=1e-6)
    # the printed summary of the resumed epoch averages all its steps, not only those after the resume
    assert len(trainer.summaries) == 2
    for got, want in zip(trainer.summaries, reference["summaries"], strict=True):
        assert summary_loss(got) == pytest.approx(summary_loss(want), abs=1e-4)


def _die_before_pointer(monkeypatch):
    original = ckpt_module.atomic_write

    def write(path, data, **kw):
        if Path(path).name == POINTER and "step_00000006" in str(data):
            raise Crash("killed after every rank wrote its files, before the pointer moved")
        return original(path, data, **kw)

    monkeypatch.setattr(ckpt_module, "atomic_write", write)


def _die_before_pruning(monkeypatch):
    original = CheckpointManager._prune

    def prune(self, keep):
        if keep == "step_00000006":
            raise Crash("killed after the pointer moved, before old checkpoints were deleted")
        return original(self, keep)

    monkeypatch.setattr(CheckpointManager, "_prune", prune)


def _die_while_exporting(monkeypatch):
    original = engine_module.export_adapter

    def export(engine, directory):
        original(engine, directory)
        raise Crash("killed after the adapter files, before train_config.yaml")

    monkeypatch.setattr(engine_module, "export_adapter", export)


@pytest.mark.parametrize("window, resumed_step", [
    (_die_before_pointer, 3), (_die_before_pruning, 6), (_die_while_exporting, 8)],
    ids=["before-pointer", "before-pruning", "during-export"])
def test_crash_windows_of_saving_and_export(window, resumed_step, reference, tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, "train.save_every=3", "train.keep_last=1")
    with monkeypatch.context() as patch:
        window(patch)
        with pytest.raises(Crash):
            Trainer(cfg, loader_factory=factory).fit()
    ckpts = tmp_path / "checkpoints"
    assert CheckpointManager(ckpts, rank=0).latest() == f"step_{resumed_step:08d}"
    trainer = Trainer(cfg, loader_factory=factory)
    trainer.fit()
    assert_same_params(params(trainer), reference["params"])
    export = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert export.keys() == reference["export"].keys()
    assert all(torch.equal(export[k], v) for k, v in reference["export"].items())
    assert (tmp_path / "final" / "train_config.yaml").is_file()
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_00000008"]


class DrawsFromTheRNG(SyntheticVideoLoader):
    """Like torch's DataLoader, takes a seed from the global RNG whenever an iteration starts."""

    def __iter__(self):
        torch.empty((), dtype=torch.int64).random_()
        return super().__iter__()


def drawing_factory(train, rank, world_size, epoch):
    return DrawsFromTheRNG(num_samples=16 if train else 6, num_classes=4, num_frames=4, size=32, batch_size=2,
                           train=train, rank=rank, world_size=world_size, num_views=2, epoch=epoch)


def test_evaluation_and_loader_seeds_leave_the_training_rng_alone(reference, tmp_path):
    """Evaluating every epoch, and loaders that draw seeds, give the weights of the run without evaluation:
    a resume (which evaluates or not depending on where it starts) then stays exact."""
    cfg = make_cfg(tmp_path, "train.save_every=3", "train.eval_every_epochs=1")
    killed = CrashAt(cfg, loader_factory=drawing_factory)
    with pytest.raises(Crash):
        killed.fit()
    assert killed.summaries_seen == 1 and CheckpointManager(tmp_path / "checkpoints", rank=0).latest() == "step_00000003"
    resumed = Trainer(cfg, loader_factory=drawing_factory)
    assert resumed.fit().eval is not None
    assert_same_params(params(resumed), reference["params"])


# -- tampered checkpoints -------------------------------------------------------------------------------
class Payload:
    """Runs a shell command when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _tamper(path: Path, marker: Path, *, zip_format: bool = True) -> None:
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: trusted here
    state["extra"] = Payload(marker)
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_tampered_checkpoint_is_refused_and_runs_no_code(killed, tmp_path, victim):
    out = copy_run(killed, tmp_path / "run")
    marker = tmp_path / "pwned"
    path = out / "checkpoints" / "step_00000003" / victim
    _tamper(path, marker)
    trainer = Trainer(make_cfg(out, "train.save_every=3"), loader_factory=factory)
    with pytest.raises(UnsafeCheckpointError) as e:
        trainer.fit()
    assert str(path) in str(e.value) and "system" in str(e.value) and "train.resume=never" in str(e.value)
    assert not marker.exists()
    assert (out / "checkpoints" / POINTER).read_text().strip() == "step_00000003"  # nothing was changed


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_every_load_is_weights_only_even_past_the_scan(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "states.pt"
    torch.save({"w": torch.ones(2)}, path)
    _tamper(path, marker, zip_format=zip_format)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        verify_checkpoint(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="system"):  # what DeepSpeed's loads go through
        ckpt_module._WeightsOnlyLoads(object()).load(str(path), map_location="cpu")
    assert not marker.exists()
    torch.save({"w": torch.ones(2), "n": 3, "s": {"a"}}, path, _use_new_zipfile_serialization=zip_format)
    verify_checkpoint(tmp_path)
    assert safe_torch_load(path)["n"] == 3


def test_resume_never_unpickles_without_the_allow_list(killed, monkeypatch, tmp_path):
    """Every load DeepSpeed makes goes through torch's weights-only unpickler, none through plain pickle."""
    out = copy_run(killed, tmp_path / "run")
    calls = []
    monkeypatch.setattr(pickle, "Unpickler", _forbidden(calls, pickle.Unpickler))
    trainer = Trainer(make_cfg(out, "train.save_every=3"), loader_factory=factory)
    trainer.setup()
    assert trainer._resume().step == 3 and not calls


def _forbidden(calls, unpickler):
    class Watched(unpickler):
        def __init__(self, *a, **kw):
            calls.append(a)
            super().__init__(*a, **kw)

    return Watched


# -- corrupt samples before the resume point ----------------------------------------------------------
def _shards(folder: Path, count: int, corrupt: int) -> list[str]:
    """One shard of ``count`` tiny mp4s (labels i % 4); sample ``corrupt`` cannot be decoded."""
    import numpy as np

    from inti_adapters.data import encode_video
    from inti_adapters.data.shards import SIZES_FILE, ShardSink, write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "part-000000.tar"
    with ShardSink(path) as sink:
        for i in range(count):
            rng = np.random.default_rng(i)
            clip = np.clip(rng.integers(0, 200, (1, 20, 20, 3)) + 8 * np.arange(6).reshape(-1, 1, 1, 1), 0, 255)
            video = b"\x00not a video" * 20 if i == corrupt else encode_video(clip.astype(np.uint8), 8, crf=10)
            sink.add(f"k{i:05d}", {"mp4": video, "cls": str(i % 4).encode()})
        sink.commit()
    write_json_atomic(folder / SIZES_FILE, {path.name: count})
    return [str(path)]




def test_resume_is_exact_when_a_corrupt_sample_lies_in_the_skipped_batches(tmp_path):
    shards = _shards(tmp_path / "shards", count=17, corrupt=4)  # 16 good clips = 8 batches of 2 = 4 steps
    data = [f"data.train_shards={json.dumps(shards)}", "data.num_frames=4", "data.crop_size=32", "data.short_side=32",
            "data.shuffle_buffer=0", "data.shard_shuffle=false", "data.train_samples=16"]
    reference = Trainer(make_cfg(tmp_path / "ref", "train.save_every=0", *data))
    reference.fit()
    assert reference.train_loader.corrupt_skipped == 2  # once per epoch
    cfg = make_cfg(tmp_path / "run", "train.save_every=3", *data)
    with pytest.raises(Crash):
        CrashAt(cfg).fit()  # the checkpoint at step 3 skips 6 batches: samples 0-12, the corrupt 4 among them
    assert json.loads((tmp_path / "run" / "checkpoints" / "step_00000003" / "run.json").read_text())["step"] == 3
    resumed = Trainer(cfg)
    resumed.fit()
    assert_same_params(params(resumed), params(reference))
    assert [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.csv")] == pytest.approx(
        [r["loss"] for r in read_metrics(tmp_path / "ref" / "metrics.csv")], abs=1e-6)


# -- a resume with another recipe ---------------------------------------------------------------------
def test_recipe_comparison_sorts_every_kind_of_change():
    saved = make_cfg("runs/a").to_dict()
    now = make_cfg("runs/b", "optim.lr=1.0", "train.seed=7", "model.grad_checkpointing=true", "train.epochs=3",
                   "data.num_workers=2", "eval.max_batches=2", "model.compressor=linear_pool", "train.bf16=true")
    changes = compare_recipes(saved, now)
    assert [c.split(":")[0] for c in changes.refused] == ["model.compressor", "train.bf16"]
    assert [c.split(":")[0] for c in changes.kept] == ["optim.lr", "train.seed"]
    assert [c.split(":")[0] for c in changes.applied] == ["data.num_workers", "train.epochs"]
    effective = type(now).from_dict(changes.effective)
    assert effective.optim.lr == 3e-3 and effective.train.seed == 0 and effective.train.epochs == 3
    assert effective.train.output_dir.endswith("runs/b") and effective.model.grad_checkpointing


@pytest.mark.parametrize("change, key", [("model.layers=[1]", "model.layers"), ("train.zero_stage=3", "zero_stage"),
                                         ("data.num_frames=8", "num_frames"), ("model.num_classes=5", "num_classes")])
def test_resume_refuses_a_recipe_that_changes_the_model_or_data_shape(killed, tmp_path, change, key):
    out = copy_run(killed, tmp_path / "run")
    trainer = Trainer(make_cfg(out, "train.save_every=3", change), loader_factory=factory)
    with pytest.raises(ConfigError, match=rf"cannot resume from .*step_00000003 with this recipe.*{key}"):
        trainer.fit()


def test_resume_with_another_lr_keeps_and_records_the_checkpoints(killed, reference, tmp_path, caplog):
    out = copy_run(killed, tmp_path / "run")
    cfg = make_cfg(out, "train.save_every=3", "optim.lr=0.5", "train.label_smoothing=0.1", "train.log_every=4")
    trainer = Trainer(cfg, loader_factory=factory)
    with caplog.at_level(logging.WARNING, logger="inti_adapters.train.engine"):
        trainer.fit()
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "optim.lr: 0.003 in the checkpoint, 0.5 now; the checkpoint's value stays in force" in warned
    assert "train.label_smoothing: 0.0 in the checkpoint, 0.1 now; the new value applies from step 3 on" in warned
    assert "log_every" not in warned  # operational keys are taken silently
    for path in (out / "config.yaml", out / "final" / "train_config.yaml"):
        text = path.read_text()
        assert "# resumed at step 3: optim.lr: 0.003 in the checkpoint, 0.5 now" in text
        saved = load_config(path)  # the comments keep it a valid recipe
        assert saved.optim.lr == 3e-3 and saved.train.label_smoothing == 0.1
    rows = read_metrics(out / "metrics.csv")  # the learning rates really are the checkpoint's schedule
    ref_lr = {r["step"]: r["lr"] for r in reference["rows"]}
    assert all(r["lr"] == pytest.approx(ref_lr[r["step"]]) for r in rows)
    # the record travels with later checkpoints, so another resume still reports it
    meta = json.loads((out / "checkpoints" / "step_00000006" / "run.json").read_text())
    assert any("optim.lr" in n for n in meta["notes"]) and meta["recipe"]["optim"]["lr"] == 3e-3


# -- two ranks under torchrun, one killed -------------------------------------------------------------
TORCHRUN_SCRIPT = textwrap.dedent('''
    import json, os, signal, sys
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    from test_faults import OVERRIDES, SyntheticVideoLoader
    from inti_adapters.train import Trainer, load_config

    out, kill_at = sys.argv[2], int(sys.argv[3])

    class Killable(Trainer):
        def on_step_end(self, step, loss):
            if step == kill_at and dist.get_rank() == 1:
                os.kill(os.getpid(), signal.SIGKILL)

    def factory(train, rank, world_size, epoch):
        return SyntheticVideoLoader(num_samples=32 if train else 6, num_classes=4, num_frames=4, size=32,
                                    batch_size=2, train=train, rank=rank, world_size=world_size, epoch=epoch)

    cfg = load_config(None, [*OVERRIDES, "train.output_dir=" + out, "train.save_every=3",
                             "train.global_batch_size=8"])
    trainer = Killable(cfg, loader_factory=factory)
    trainer.fit()
    sums = {k: float(v.double().sum()) for k, v in trainer.engine.module.state_dict().items()}
    with open(f"{out}/params_rank{dist.get_rank()}.json", "w") as f:
        json.dump(sums, f)
''')


def _torchrun(script: Path, out: Path, kill_at: int) -> subprocess.CompletedProcess:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script), str(HERE), str(out), str(kill_at)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_rank_killed_then_resumed_matches_the_uninterrupted_run(tmp_path):
    script = tmp_path / "train2.py"
    script.write_text(TORCHRUN_SCRIPT)
    ref, run = tmp_path / "ref", tmp_path / "run"
    proc = _torchrun(script, ref, kill_at=-1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = _torchrun(script, run, kill_at=5)
    assert proc.returncode != 0 and not (run / "final").exists()
    assert (run / "checkpoints" / POINTER).read_text().strip() == "step_00000003"
    proc = _torchrun(script, run, kill_at=-1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in range(2):
        got = json.loads((run / f"params_rank{rank}.json").read_text())
        want = json.loads((ref / f"params_rank{rank}.json").read_text())
        assert got == pytest.approx(want, rel=0, abs=1e-6)
    assert [r["loss"] for r in read_metrics(run / "metrics.csv")] == pytest.approx(
        [r["loss"] for r in read_metrics(ref / "metrics.csv")], abs=1e-6)
