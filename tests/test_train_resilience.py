"""Ranks on one host (gloo on loopback, ZeRO-2): preemption by SIGTERM (checkpoint, exit 75, exact resume), a
rank killed or hung mid-epoch (PeerLostError within train.dist_timeout_s, exact resume), and resuming on
another number of ranks (2 -> 1, 1 -> 2: every remaining sample of the epoch trained once)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections import Counter

import pytest
from _train_ranks import EPOCHS, SAMPLES, epoch_keys, launch, logs, losses, run, trained, wait, wait_for

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

PREEMPTED = 75
STEPS = EPOCHS * SAMPLES // 8


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("ranks")


@pytest.fixture(scope="module")
def reference(base):
    """Two ranks, uninterrupted."""
    out = base / "reference"
    codes = run(out, 2)
    assert codes == [0, 0], logs(out)
    return out


@pytest.fixture(scope="module")
def preempted(base):
    """Two ranks, SIGTERM to both mid-epoch 1 (as Slurm signals every task); a copy of the folder is kept."""
    out = base / "preempted"
    procs = launch(out, 2, env={"SLOW_AFTER": "2"})
    wait_for("at_step2_rank*", out, procs)
    for p in procs:
        os.kill(p.pid, signal.SIGTERM)
    codes = wait(procs)
    assert codes == [PREEMPTED, PREEMPTED], logs(out)
    shutil.copytree(out, base / "preempted_copy", ignore=shutil.ignore_patterns("log_rank*"))
    return out


def test_sigterm_checkpoints_exits_75_and_resumes_exactly(reference, preempted):
    marker = json.loads((preempted / "PREEMPTED").read_text())
    assert marker["signal"] == "SIGTERM" and 2 <= marker["step"] < SAMPLES // 8  # stopped mid-epoch 1
    pointer = (preempted / "checkpoints" / "last_good").read_text().strip()
    assert pointer == f"step_{marker['step']:08d}"
    assert codes_ok(run(preempted, 2), preempted)
    assert not (preempted / "PREEMPTED").exists()  # a run that starts removes it
    assert trained(preempted, 2) == trained(reference, 2)  # the same keys in the same steps on each rank
    got, want = losses(preempted), losses(reference)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)) == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-6)


def codes_ok(codes: list[int], out) -> bool:
    assert codes == [0] * len(codes), logs(out)
    return True


@pytest.mark.parametrize("new_world", [1])
def test_resume_two_ranks_on_one(preempted, base, new_world):
    """2 -> 1: the rest of the epoch trains exactly the samples not trained before the checkpoint, each once."""
    out = base / "preempted_copy"
    before = set(epoch_keys(out, 2, 0))
    step0 = json.loads((out / "PREEMPTED").read_text())["step"]
    assert codes_ok(run(out, new_world), out)
    assert not (out / "PREEMPTED").exists()  # removed by the resumed run
    after = [k for line in trained(out, 1)[0] if line["epoch"] == 0 and line["step"] > step0 for k in line["keys"]]
    assert Counter(after) == Counter({f"syn{i:06d}": 1 for i in range(SAMPLES)}) - Counter(before)
    assert len(before) + len(after) == SAMPLES
    assert [s for s, _ in losses(out)] == list(range(1, STEPS + 1))  # same schedule and step count
    assert sorted(epoch_keys(out, 1, 1)) == [f"syn{i:06d}" for i in range(SAMPLES)]  # the next epoch as usual


def test_job_wide_signal_then_resume_one_rank_on_two(base):
    """One rank with a DataLoader worker gets SIGUSR1 with its whole process group (as Slurm signals every process
    of a job step): the worker must not die of it (torch's workers do, failing the run); the run checkpoints and
    exits 75. Then 1 -> 2 ranks: the rest of the epoch trains each remaining sample once."""
    out = base / "one"
    procs = launch(out, 1, env={"SLOW_AFTER": "1", "WORKERS": "1"})
    wait_for("at_step1_rank0", out, procs)
    os.killpg(procs[0].pid, signal.SIGUSR1)  # the rank and its loader worker (the rank leads its own group)
    assert wait(procs) == [PREEMPTED], logs(out)
    marker = json.loads((out / "PREEMPTED").read_text())
    step = marker["step"]
    assert marker["signal"] == "SIGUSR1"
    before = set(epoch_keys(out, 1, 0))
    assert len(before) == 8 * step
    assert codes_ok(run(out, 2), out)
    after = [k for r in range(2) for line in trained(out, 2)[r] if line["epoch"] == 0 and line["step"] > step
             for k in line["keys"]]
    assert Counter(after) == Counter({f"syn{i:06d}": 1 for i in range(SAMPLES)}) - Counter(before)
    assert [s for s, _ in losses(out)] == list(range(1, STEPS + 1))


def test_killed_peer_fails_fast_with_the_named_error(base):
    """kill -9 of rank 1 mid-epoch: rank 0 stops with the named error within the timeout; the last complete
    checkpoint stays the latest. (That a relaunch after a kill -9 is exact: tests/test_faults.py's torchrun test;
    from a checkpoint of these ranks: the SIGTERM test above.)"""
    out, timeout = base / "killed", 8
    procs = launch(out, 2, "train.save_every=2", f"train.dist_timeout_s={timeout}", env={"SLOW_AFTER": "3"})
    wait_for("at_step3_rank1", out, procs)
    os.kill(procs[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    code = wait(procs[:1], timeout=timeout + 30)[0]
    assert code not in (0, PREEMPTED), logs(out)
    assert time.monotonic() - t0 < timeout + 15
    assert "a peer was lost during" in logs(out) and f"dist_timeout_s={timeout:g}" in logs(out)
    wait(procs[1:])
    assert (out / "checkpoints" / "last_good").read_text().strip() == "step_00000002"


def test_hung_peer_times_out(base):
    """A rank that stops answering (SIGSTOP: its sockets stay open, as behind a cut link) makes the other one
    exit within train.dist_timeout_s plus a margin, with the named error, never a hang."""
    out, timeout = base / "hung", 5
    procs = launch(out, 2, f"train.dist_timeout_s={timeout}", env={"SLOW_AFTER": "2", "SLOW_S": "0.1"})
    wait_for("at_step2_rank1", out, procs)
    os.kill(procs[1].pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        code = wait(procs[:1], timeout=timeout + 40)[0]
        elapsed = time.monotonic() - t0
    finally:
        os.kill(procs[1].pid, signal.SIGKILL)
        wait(procs[1:])
    assert code not in (0, PREEMPTED), logs(out)
    assert timeout - 1 < elapsed < timeout + 20, (elapsed, logs(out))
    assert "a peer was lost during" in logs(out)

