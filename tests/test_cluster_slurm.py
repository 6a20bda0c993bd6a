"""The shipped Slurm script (``recipes/launch/slurm.sbatch``) on a real two-node Slurm 22.05 cluster:
munged, slurmctld and a slurmd per network-namespace host, started by the test (issue 26 item 3).

``sbatch --wait`` of the script on a tiny digits recipe finishes and trains each sample once per
epoch; ``scancel --signal=USR1 --batch`` (what ``--signal=B:USR1@...`` sends before the time limit)
ends in the preemption checkpoint, ``OUTPUT_DIR/PREEMPTED`` and a requeue, and the requeued job
resumes and finishes with the keys and losses of the uninterrupted job. Skipped, with the reason,
where namespaces or Slurm cannot be had (``make cluster-deps``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from _cluster import (
    SHARDS,
    digits_root,
    final_keys,
    last_step,
    sample_log,
    step_losses,
    train_env,
    write_recipe,
)
from _netns import Network, netns_unavailable, wait_for
from _slurm import SlurmCluster, slurm_unavailable, which

from inti_adapters.recipes import RECIPES_DIR, describe_recipes

pytest.importorskip("deepspeed")

SCRIPT = RECIPES_DIR / "launch" / "slurm.sbatch"
JOB_TIMEOUT = 300  # seconds a job may take on a loaded 2-core machine


def test_script_is_package_data_and_listed():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    globs = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["inti_adapters.recipes"]
    assert "launch/*.sbatch" in globs and SCRIPT.is_file()
    listed = describe_recipes()
    assert str(SCRIPT) in listed and "Slurm" in listed


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = netns_unavailable() or slurm_unavailable()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("slurm")
    root = digits_root(tmp_path_factory.getbasetemp())
    net = Network()
    try:
        hosts = [net.add_host("a"), net.add_host("b")]
        cluster = SlurmCluster(hosts, base / "slurm")
        try:
            cluster.base = base
            cluster.recipe = write_recipe(base / "digits_tiny.yaml", str(root / SHARDS))
            yield cluster
        finally:
            cluster.stop()
    finally:
        net.close()


def submit(cluster: SlurmCluster, out: Path, *args: str, timeout: float = 30) -> str:
    env = {**train_env(), "SLURM_CONF": str(cluster.conf), "RECIPE": str(cluster.recipe), "NPROC_PER_NODE": "1",
           "PYTHON": sys.executable, "OUTPUT_DIR": str(out)}
    proc = cluster.hosts[0].run([which("sbatch"), "--parsable", f"--chdir={cluster.base}",
                                 f"--output={out}.slurm.out", *args, SCRIPT], timeout=timeout, env=env)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}\n{cluster.logs()}"
    return proc.stdout.strip().split(";")[0]


def job_output(out: Path) -> str:
    path = Path(f"{out}.slurm.out")
    return path.read_text(errors="replace") if path.exists() else "(no job output)"


@pytest.mark.slow
def test_sbatch_preempted_job_requeues_and_resumes(slurm):
    # the uninterrupted job: sbatch --wait returns its exit status
    ref = slurm.base / "uninterrupted"
    job = submit(slurm, ref, "--wait", timeout=JOB_TIMEOUT)
    state = slurm.job_state(job)
    assert state["JobState"] == "COMPLETED", f"{state}\n{job_output(ref)[-4000:]}"
    keys = final_keys(ref)
    for epoch in (0, 1):
        trained = sorted(k for (_, e, _), ks in keys.items() if e == epoch for k in ks)
        assert len(trained) == 48 and len(set(trained)) == 48
    assert (ref / "final" / "adapter_model.safetensors").is_file()

    # the same job, sent USR1 (the script's --signal=B:USR1@...) mid-epoch: checkpoint, requeue, resume
    out = slurm.base / "preempted"
    job = submit(slurm, out)
    wait_for(lambda: last_step(out) >= 3 or slurm.job_state(job)["JobState"] not in ("PENDING", "RUNNING"),
             JOB_TIMEOUT, "step 3 of the second job", interval=0.5)
    assert last_step(out) >= 3, job_output(out)[-4000:]
    slurm.command(["scancel", "--signal=USR1", "--batch", job])
    deadline, hurried = time.monotonic() + JOB_TIMEOUT, False
    while (state := slurm.job_state(job))["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        if state["JobState"] == "PENDING" and state.get("Reason") == "BeginTime" and not hurried:
            hurried = True
            # a requeued job waits ~2 min for its begin time; not "now": slurmd refuses a credential of the
            # second in which the job's previous one was revoked ("Job credential revoked", the job fails)
            slurm.command(["scontrol", "update", f"JobId={job}", "StartTime=now+3"])
        assert time.monotonic() < deadline, f"job {job} not done after {JOB_TIMEOUT} s: {state}"
        time.sleep(1)
    text = job_output(out)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", f"{state}\n{text[-4000:]}"
    assert "preempted (" in text and "requeueing job" in text and "(restart 1)" in text
    assert not (out / "PREEMPTED").exists()  # removed when the requeued run started
    # the PREEMPTED file the script found (it prints it): the checkpoint of the step the signal interrupted
    marker = json.loads(text[text.index("preempted (") + len("preempted ("):text.index("); requeueing")])
    assert marker["signal"] == "SIGTERM" and marker["exit_status"] == 75 and 3 <= marker["step"] < 12
    # no step lost or trained twice: the requeued run went on from that very step
    assert [e["step"] for e in sample_log(out)[0]] == list(range(1, 13))
    assert final_keys(out) == keys
    assert step_losses(out) == pytest.approx(step_losses(ref), abs=1e-5)
