"""One process: a non-finite loss stops the run naming the step (or is skipped), the output folder's lock,
a full disk during a checkpoint save, TensorBoard and W&B (offline) files."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from test_train_engine import factory, make_cfg, one_thread  # noqa: F401  (one_thread: autouse fixture)

from inti_adapters.data import _lock as output_lock
from inti_adapters.train import NonFiniteLossError, RunLockedError, Trainer
from inti_adapters.train.checkpoint import POINTER
from inti_adapters.train.preemption import blocked_in_children, stop_children
from inti_adapters.train.runlock import LOCK_NAME, RunLock

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:torch.distributed")


class NaNAt(Trainer):
    """The loss of one micro-batch of step ``bad_step`` (every micro-batch of later steps with ``forever``) is NaN."""

    bad_step, forever = 3, False

    def _forward(self, batch):
        loss, keys = super()._forward(batch)
        if self._at_step == self.bad_step or (self.forever and self._at_step > self.bad_step):
            loss = loss * float("nan")
            self.bad_step = -1 if not self.forever else self.bad_step
        return loss, keys


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    cfg = make_cfg(tmp_path, "train.zero_stage=2", "train.save_every=2")
    trainer = NaNAt(cfg, loader_factory=factory)
    with pytest.raises(NonFiniteLossError, match=r"step 3 \(epoch 1\): the loss is nan") as e:
        trainer.fit()
    assert str(tmp_path / "checkpoints" / "step_00000002") in str(e.value)
    assert (tmp_path / "checkpoints" / POINTER).read_text().strip() == "step_00000002"
    assert not (tmp_path / "checkpoints" / "step_00000003").exists()
    assert not (tmp_path / "final").exists()  # nothing exported


def test_max_nonfinite_steps_skips_bad_micro_batches(tmp_path):
    cfg = make_cfg(tmp_path, "train.zero_stage=2", "train.save_every=0", "train.max_nonfinite_steps=1")
    trainer = NaNAt(cfg, loader_factory=factory)
    result = trainer.fit()
    assert result.step == 8
    assert all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    # two bad steps with one allowed: the second stops the run
    cfg = make_cfg(tmp_path / "b", "train.zero_stage=2", "train.save_every=0", "train.max_nonfinite_steps=1")
    trainer = NaNAt(cfg, loader_factory=factory)
    trainer.forever = True
    with pytest.raises(NonFiniteLossError, match=r"step 4 \(epoch 1\).*max_nonfinite_steps=1"):
        trainer.fit()


HOLDER = textwrap.dedent('''
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("_lock", sys.argv[2])  # the module alone: no torch import
    _lock = importlib.util.module_from_spec(spec); spec.loader.exec_module(_lock)
    lock = _lock.OutputLock(sys.argv[1], "inti-train"); lock.acquire(); print("locked", flush=True); time.sleep(60)
''')


def test_a_second_run_on_a_live_runs_folder_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), output_lock.__file__], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        trainer = Trainer(make_cfg(tmp_path, "train.save_every=0"), loader_factory=factory)
        with pytest.raises(RunLockedError) as e:
            trainer.fit()
        msg = str(e.value)
        assert str(tmp_path) in msg and f"pid {holder.pid}" in msg and socket.gethostname() in msg
        assert trainer.engine is None  # refused before anything was built or written
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # the holder died without releasing: its lock is stale and is taken over
    record = json.loads((tmp_path / LOCK_NAME).read_text())
    assert record["pid"] == holder.pid
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released on exit


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs (root only; skipped with the reason otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


class FillsDiskAfter(Trainer):
    """After step 2's checkpoint, something else fills the disk."""

    def on_step_end(self, step, loss):
        if step == 2:
            with open(self.out_dir / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass


def test_full_disk_during_a_checkpoint_names_the_device_and_file(small_disk):
    cfg = make_cfg(small_disk, "train.zero_stage=2", "train.save_every=2", "train.keep_last=1")
    with pytest.raises(OSError, match=r"no space left on tmpfs \(mounted on .*small\) while writing .*step_00000004"):
        FillsDiskAfter(cfg, loader_factory=factory).fit()
    assert (small_disk / "checkpoints" / POINTER).read_text().strip() == "step_00000002"
    (small_disk / "filler").unlink()
    result = Trainer(make_cfg(small_disk, "train.zero_stage=2", "train.save_every=0", "train.keep_last=1"),
                     loader_factory=factory).fit()
    assert result.step == 8  # resumed from step 2


def test_tensorboard_and_wandb_offline_files(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (the train extra installs it)")
    pytest.importorskip("wandb", reason="wandb is not installed (the dev extra installs it)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg(tmp_path, "train.save_every=0", "train.tensorboard=true", "train.epochs=1",
                   "train.steps_per_epoch=2", "optim.warmup_steps=1", "train.wandb={project: inti-test}")
    Trainer(cfg, loader_factory=factory).fit()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), list((tmp_path / "wandb").rglob("*"))
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith(f"-{run_id}")  # kept, so that a resumed run continues the same W&B run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]


def test_resume_with_another_data_set_is_refused(tmp_path):
    """The data position and the keys trained in the epoch belong to the checkpoint's data set: another one is
    refused with the key named, like another model."""
    from inti_adapters.train import ConfigError
    from inti_adapters.train.config import compare_recipes, load_config
    from inti_adapters.train.resume import reconcile_recipe

    saved = load_config(None, ["data.train_shards=/data/a-{000000..000003}.tar", "data.batch_size=2"])
    now = load_config(None, ["data.train_shards=/data/b-{000000..000003}.tar", "data.batch_size=2"])
    assert [c.split(":")[0] for c in compare_recipes(saved.to_dict(), now).refused] == ["data.train_shards"]
    with pytest.raises(ConfigError, match=r"cannot resume from .*step_00000004.*data.train_shards: '/data/a-"):
        reconcile_recipe(now, {"recipe": saved.to_dict(), "facts": {}}, tmp_path / "step_00000004", {}, True)


def _sleep_forever() -> None:
    time.sleep(3600)


def test_loader_workers_forked_with_blocked_signals_are_stopped_on_the_way_out():
    """A worker forked with SIGTERM blocked survives terminate() (so a failed rank hung at exit, joining it);
    stop_children kills it."""
    ctx = multiprocessing.get_context("fork")
    with blocked_in_children(["SIGTERM", "SIGUSR1"]) as forked:
        worker = ctx.Process(target=_sleep_forever, daemon=True)
        worker.start()
    assert forked == [worker]
    worker.terminate()
    worker.join(timeout=1.0)
    assert worker.is_alive()  # SIGTERM is blocked in it: what multiprocessing's exit handler would wait on forever
    started = time.monotonic()
    stop_children(forked)
    assert not worker.is_alive() and worker.exitcode == -signal.SIGKILL and time.monotonic() - started < 5


class _Endless(torch.utils.data.IterableDataset):
    def __iter__(self):
        i = 0
        while True:
            yield torch.tensor(i)
            i += 1


def test_stopping_a_live_dataloader_worker_raises_nothing_afterwards():
    """torch's SIGCHLD handler raises 'DataLoader worker ... is killed by signal' for a killed worker it still
    tracks; a preempted rank then exited 1 instead of 75. stop_children kills without tripping it."""
    loader = torch.utils.data.DataLoader(_Endless(), batch_size=None, num_workers=1,
                                         multiprocessing_context="fork")
    with blocked_in_children(["SIGTERM", "SIGUSR1"]) as forked:
        it = iter(loader)
    assert int(next(it)) == 0 and len(forked) == 1
    stop_children(forked)
    assert not forked[0].is_alive() and forked[0].exitcode == -signal.SIGKILL
    for _ in range(20):  # a pending SIGCHLD handler would raise here
        time.sleep(0.01)
    assert signal.getsignal(signal.SIGCHLD) is not signal.SIG_DFL  # torch's handler is back
    del it
