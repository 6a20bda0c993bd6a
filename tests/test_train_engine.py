"""The DeepSpeed engine in one CPU process (gloo): exact resume, crash-safe checkpoints, ZeRO-3 export."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from inti_adapters import load_pretrained, normalize_video
from inti_adapters.train import (
    PREEMPTED_EXIT_CODE,
    Preempted,
    SyntheticVideoLoader,
    Trainer,
    create_backbone,
    load_config,
)
from inti_adapters.train.checkpoint import POINTER, resolve_resume, rng_state, set_rng_state
from inti_adapters.train.metrics import read_metrics

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:torch.distributed")

TINY_KW = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2, "depth": 4, "drop_path_rate": 0.1}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # a shared 2-core machine: one intra-op thread per process is faster and keeps runs reproducible
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_cfg(out, *overrides):
    return load_config(None, [
        "model.name=vit_base_patch16_clip_224", f"model.model_kwargs={json.dumps(TINY_KW)}", "model.layers=[1, 2]",
        "model.num_classes=4", f"train.output_dir={out}", "train.epochs=2", "train.grad_accum=2",
        "train.progress=false", "train.tensorboard=false", "train.log_every=1", "train.eval_every_epochs=0",
        "optim.lr=3e-3", "optim.warmup_steps=2", "data.batch_size=2", *overrides])


def factory(train, rank, world_size, epoch):
    # 16 clips / batch 2 = 8 micro-batches = 4 optimizer steps (grad_accum 2) per epoch
    return SyntheticVideoLoader(num_samples=16 if train else 6, num_classes=4, num_frames=4, size=32, batch_size=2,
                                train=train, rank=rank, world_size=world_size, num_views=2, epoch=epoch)


class Crash(RuntimeError):
    pass


class CrashAt(Trainer):
    """Dies right after optimizer step ``crash_at``, like a killed job (no final save)."""

    crash_at = -1

    def on_step_end(self, step: int, loss: float) -> None:
        if step == self.crash_at:
            raise Crash(f"killed after step {step}")


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted ZeRO-2 run of 8 steps (2 epochs x 4)."""
    out = tmp_path_factory.mktemp("reference")
    trainer = Trainer(make_cfg(out, "train.zero_stage=2", "train.save_every=0"), loader_factory=factory)
    result = trainer.fit()
    return params(trainer), read_metrics(out / "metrics.csv"), result


def test_reference_run_learns_and_exports(reference):
    _, rows, result = reference
    assert result.step == 8 and [s for s, _ in result.history] == list(range(1, 9))
    assert [r["step"] for r in rows] == list(range(1, 9)) and {r["epoch"] for r in rows} == {0, 1}
    losses = [loss for _, loss in result.history]
    assert sum(losses[-2:]) < sum(losses[:2])
    assert (result.export_dir / "adapter_model.safetensors").is_file()
    assert (result.export_dir / "train_config.yaml").is_file()


def test_killed_run_resumes_to_the_same_parameters(tmp_path, reference):
    ref_params, ref_rows, _ = reference
    cfg = make_cfg(tmp_path, "train.zero_stage=2", "train.save_every=3")
    killed = CrashAt(cfg, loader_factory=factory)
    killed.crash_at = 5
    with pytest.raises(Crash):
        killed.fit()
    assert (tmp_path / "checkpoints" / POINTER).read_text().strip() == "step_00000003"
    # step 3 is in the middle of epoch 0: the resume must skip 6 micro-batches and restore the RNG
    resumed = Trainer(cfg, loader_factory=factory)
    result = resumed.fit()
    assert result.step == 8
    got = params(resumed)
    assert got.keys() == ref_params.keys()
    for k, v in ref_params.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)
    # the metrics file holds one curve, identical to the uninterrupted run's
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], abs=1e-6)


def test_crash_during_a_save_keeps_the_last_good_checkpoint(tmp_path, reference, monkeypatch):
    import deepspeed.runtime.engine as ds_engine

    ref_params, _, _ = reference
    cfg = make_cfg(tmp_path, "train.zero_stage=2", "train.save_every=3", "train.keep_last=1")
    original = ds_engine.DeepSpeedEngine.save_checkpoint

    def dies_midway(self, save_dir, tag=None, **kw):
        if tag == "step_00000006":  # DeepSpeed writes its files, then the job dies before the pointer moves
            original(self, save_dir, tag=tag, **kw)
            raise Crash("killed while saving")
        return original(self, save_dir, tag=tag, **kw)

    monkeypatch.setattr(ds_engine.DeepSpeedEngine, "save_checkpoint", dies_midway)
    with pytest.raises(Crash):
        Trainer(cfg, loader_factory=factory).fit()
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / POINTER).read_text().strip() == "step_00000003"
    assert not (ckpts / "step_00000006" / "rng_rank0.pt").exists()  # the interrupted save is incomplete
    monkeypatch.setattr(ds_engine.DeepSpeedEngine, "save_checkpoint", original)
    resumed = Trainer(cfg, loader_factory=factory)
    resumed.fit()
    for k, v in ref_params.items():
        torch.testing.assert_close(params(resumed)[k], v, rtol=0, atol=1e-6, msg=k)
    # keep_last=1: only the newest complete checkpoint stays
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_00000008"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_zero3_export_gathers_partitioned_parameters(tmp_path, lora):
    cfg = make_cfg(tmp_path, "train.zero_stage=3", "train.epochs=1", "train.steps_per_epoch=2", "train.save_every=0",
                   "optim.warmup_steps=1", *(["model.lora={r: 4, lora_alpha: 8}"] if lora else []))
    trainer = Trainer(cfg, loader_factory=factory)
    result = trainer.fit()
    module = trainer.engine.module
    partitioned = [n for n, p in module.named_parameters() if hasattr(p, "ds_id") and p.numel() == 0]
    assert any(n.endswith(("blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.base_layer.weight")) for n in partitioned)
    assert "compressors.1.time_embed" in partitioned
    assert any("lora_B" in n for n in partitioned) == lora
    clips, _ = next(iter(factory(False, 0, 1, 0)))
    x = normalize_video(clips[:, 0], trainer.mean_std)
    trainer.engine.eval()
    with torch.no_grad():
        expected = trainer.engine(x)
    # the files hold full tensors, not ZeRO-3's empty placeholders
    # LoRA keeps the base weights frozen and out of the export: rebuild them as the run did (seed 0);
    # full fine-tuning saves everything, so any initialisation must give the same outputs
    torch.manual_seed(cfg.train.seed if lora else 123)
    backbone, head = create_backbone(cfg.model, 4, lora=False)
    shapes = {f"backbone.{k}": v.shape for k, v in backbone.state_dict().items()}
    files = ["adapter_model.safetensors", "peft/adapter_model.safetensors" if lora else "backbone_model.safetensors"]
    saved = {k: v for f in files for k, v in load_file(str(result.export_dir / f)).items()}
    assert {k for k in saved if k.startswith("compressors.")} and all(v.numel() > 0 for v in saved.values())
    assert all(saved[k].shape == shapes[k] for k in saved if k in shapes)
    if lora:  # trained: LoRA's B factors start at zero
        assert any("lora_B" in k and saved[k].abs().sum() > 0 for k in saved)
    fresh = load_pretrained(backbone, result.export_dir, head=head).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=1e-6)


def test_resume_resolution_and_rng_round_trip(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert resolve_resume("auto", ckpts) is None and resolve_resume("never", ckpts) is None
    (ckpts / "step_00000004").mkdir(parents=True)
    (ckpts / "step_00000008").mkdir()  # newer, but incomplete: no pointer to it
    assert resolve_resume("auto", ckpts) is None
    (ckpts / POINTER).write_text("step_00000004\n")
    assert resolve_resume("auto", ckpts) == (ckpts, "step_00000004")
    assert resolve_resume("never", ckpts) is None
    assert resolve_resume(str(ckpts), tmp_path / "elsewhere") == (ckpts, "step_00000004")
    assert resolve_resume(str(ckpts / "step_00000008"), tmp_path) == (ckpts, "step_00000008")
    with pytest.raises(FileNotFoundError, match="expected 'auto', 'never', a checkpoints directory"):
        resolve_resume(str(tmp_path / "nope"), ckpts)
    # RNG state survives a weights_only round trip and restores every generator
    import random

    import numpy as np

    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_consolidated_state_resumes_like_deepspeeds_own_files(tmp_path, reference):
    """The world-size-independent state (full fp32 weights + Adam moments, safetensors) that a resume on another
    world size loads gives the same run as DeepSpeed's ZeRO files: loaded here at the same size by pretending the
    checkpoint came from 2 ranks, the rest of the run equals the uninterrupted one."""
    ref_params, ref_rows, _ = reference
    cfg = make_cfg(tmp_path, "train.zero_stage=2", "train.save_every=4")
    killed = CrashAt(cfg, loader_factory=factory)
    killed.crash_at = 5
    with pytest.raises(Crash):
        killed.fit()
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    assert {"consolidated.safetensors", "consolidated.json", "epoch_keys_rank0.json"} <= {p.name for p in ckpt.iterdir()}
    saved = load_file(str(ckpt / "consolidated.safetensors"))
    assert {k.split("/")[0] for k in saved} == {"param", "exp_avg", "exp_avg_sq"}
    meta = json.loads((ckpt / "run.json").read_text())
    meta["facts"]["world_size"] = 2  # DeepSpeed's ZeRO files would now be refused: the consolidated state is used
    (ckpt / "run.json").write_text(json.dumps(meta))
    resumed = Trainer(cfg, loader_factory=factory)
    resumed.fit()
    for k, v in ref_params.items():
        torch.testing.assert_close(params(resumed)[k], v, rtol=0, atol=1e-6, msg=k)
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], abs=1e-6)


class SignalledDuringSave(Trainer):
    """Sends itself SIGTERM twice while its first checkpoint is being written."""

    def _save(self, *args, **kwargs):
        if not getattr(self, "_signalled", False):
            self._signalled = True
            original = self.ckpt.save

            def save(engine, step, state, **kw):
                os.kill(os.getpid(), signal.SIGTERM)
                extra = kw.pop("before_commit")

                def commit(directory):
                    os.kill(os.getpid(), signal.SIGTERM)  # a second signal, in the middle of the save
                    extra(directory)
                return original(engine, step, state, before_commit=commit, **kw)

            self.ckpt.save = save
        return super()._save(*args, **kwargs)


def test_signal_during_a_save_ends_in_a_loadable_checkpoint(tmp_path, reference):
    ref_params, ref_rows, _ = reference
    cfg = make_cfg(tmp_path, "train.zero_stage=2", "train.save_every=2")
    with pytest.raises(Preempted) as stopped:
        SignalledDuringSave(cfg, loader_factory=factory).fit()
    assert stopped.value.code == PREEMPTED_EXIT_CODE == 75
    # the save in progress (step 2) completed; the next step (3) finished, then the preemption checkpoint
    marker = json.loads((tmp_path / "PREEMPTED").read_text())
    assert marker["step"] == 3 and marker["signal"] == "SIGTERM"
    assert (tmp_path / "checkpoints" / POINTER).read_text().strip() == "step_00000003"
    resumed = Trainer(cfg, loader_factory=factory)
    assert resumed.fit().step == 8
    assert not (tmp_path / "PREEMPTED").exists()
    for k, v in ref_params.items():
        torch.testing.assert_close(params(resumed)[k], v, rtol=0, atol=1e-6, msg=k)
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], abs=1e-6)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are restored after fit


class SignalAfter(Trainer):
    """SIGTERM to itself after step 2; counts the saves of each step."""

    def on_step_end(self, step, loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    def _save(self, step, *args, **kwargs):
        self.saved = [*getattr(self, "saved", []), step]
        return super()._save(step, *args, **kwargs)


def test_preemption_after_a_save_of_the_same_step_keeps_it(tmp_path):
    """With save_every=1 the step that ends the run is already saved: it is not written a second time in place."""
    trainer = SignalAfter(make_cfg(tmp_path, "train.save_every=1"), loader_factory=factory)
    with pytest.raises(Preempted):
        trainer.fit()
    assert trainer.saved == [1, 2, 3]  # the signal after step 2 is agreed on in step 3, which then ends the run
    assert json.loads((tmp_path / "PREEMPTED").read_text())["checkpoint"] == str(tmp_path / "checkpoints" / "step_00000003")


def test_consolidated_state_under_bf16_equals_deepspeeds_resume(tmp_path):
    """bf16 + ZeRO-2 (the GPU recipes' setting; DeepSpeed runs it on the CPU too): the consolidated state holds
    the fp32 master weights, so a resume through it ends with the same weights as DeepSpeed's own resume."""
    final = {}
    for via_consolidated in (False, True):
        out = tmp_path / str(via_consolidated)
        cfg = make_cfg(out, "train.zero_stage=2", "train.save_every=4", "train.bf16=true")
        killed = CrashAt(cfg, loader_factory=factory)
        killed.crash_at = 5
        with pytest.raises(Crash):
            killed.fit()
        if via_consolidated:
            run_json = out / "checkpoints" / "step_00000004" / "run.json"
            meta = json.loads(run_json.read_text())
            meta["facts"]["world_size"] = 2
            run_json.write_text(json.dumps(meta))
        resumed = Trainer(cfg, loader_factory=factory)
        resumed.fit()
        assert resumed.engine.bfloat16_enabled()
        final[via_consolidated] = params(resumed)
    for k, v in final[False].items():
        torch.testing.assert_close(final[True][k], v, rtol=0, atol=0, msg=k)
