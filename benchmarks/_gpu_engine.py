"""Part 3 of the GPU suite: a short run of the real training engine, then a resume from its middle.

The suite launches this file the way users launch training, ``torchrun --nproc_per_node 1``
(``python -m torch.distributed.run``), so DeepSpeed, NCCL (gloo on CPU) and the process group
come up exactly as in a real job. The worker trains ``recipes/digits_cpu.yaml`` (built-in
moving digits, generated on first use into the work directory) with ZeRO-2, bf16 on a GPU,
checkpointing at ``save_at``; then a second ``Trainer`` in the same process resumes from that
checkpoint into a fresh output directory and trains to the end. It writes a JSON file after each
run, so a run stopped by the budget still reports the first one.

The suite starts the worker at its beginning with ``--go FILE``: the worker imports what the
engine needs (torch, DeepSpeed, peft, ...) and generates its data set on the CPU while part 1
runs, then waits until the suite writes ``go`` (or ``stop``) into FILE. The imports and the data
set are a fixed cost of any job; overlapping them keeps them out of the device's time.

    python -m torch.distributed.run --nproc_per_node 1 benchmarks/_gpu_engine.py --json out.json --work DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
RECIPE = REPO_ROOT / "recipes" / "digits_cpu.yaml"
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")


# -- worker (runs under torchrun) ------------------------------------------------------------------
def overrides(a: argparse.Namespace, out: Path, resume: str, cuda: bool) -> list[str]:
    """The recipe changes: a small data set in the work directory, ``epochs`` short epochs, a mid-run save."""
    return [f"builtin_data.root={a.work / 'digits'}", f"builtin_data.num_train={a.clips}",
            "builtin_data.num_val=8", f"builtin_data.workers={a.data_workers}",
            f"builtin_data.samples_per_shard={max(1, a.clips // 4)}",  # shards for every loader worker
            f"data.batch_size={a.batch}", f"data.num_workers={a.loader_workers}",
            f"train.output_dir={out}", f"train.epochs={a.epochs}", f"train.save_every={a.save_at}",
            "train.keep_last=4", "train.log_every=1", "train.eval_every_epochs=0", "train.progress=false",
            "train.tensorboard=false", f"train.resume={resume}", "train.zero_stage=2",
            f"train.bf16={'true' if cuda else 'false'}", f"train.backend={'nccl' if cuda else 'gloo'}",
            f"optim.lr={a.lr}"]


def run_one(a: argparse.Namespace, name: str, resume: str) -> dict[str, Any]:
    """Train (or resume) to the end; the history, per-step wall times and what the engine was."""
    import torch
    import torch.distributed as dist

    from inti_adapters.train import Trainer, load_config

    class Timed(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.ends: list[float] = []

        def on_step_end(self, step: int, loss: float) -> None:
            self.ends.append(time.perf_counter())  # the loop already waited for the loss (float())

    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    trainer = Timed(load_config(RECIPE, overrides(a, a.work / name, resume, cuda)))
    trainer.setup()
    t1 = time.perf_counter()
    result = trainer.fit()
    t2 = time.perf_counter()
    engine = trainer.engine
    return {"history": [[int(s), float(v)] for s, v in result.history], "final_step": int(result.step),
            "step_ends": trainer.ends, "setup_s": t1 - t0, "fit_s": t2 - t1, "global_batch": trainer.global_batch,
            "steps_per_epoch": trainer.steps_per_epoch, "device": str(engine.device), "backend": dist.get_backend(),
            "zero_stage": int(engine.zero_optimization_stage()), "bf16": bool(engine.bfloat16_enabled()),
            "optimizer": type(engine.optimizer).__name__, "world_size": dist.get_world_size(),
            "checkpoints": sorted(p.name for p in (a.work / name / "checkpoints").glob("step_*"))}


def prewarm(a: argparse.Namespace) -> None:
    """What a job does before it touches the device: imports, and the data set generated into the work dir."""
    import importlib

    import deepspeed  # noqa: F401

    from inti_adapters.data import ensure_builtin_dataset
    from inti_adapters.train import load_config

    # modules the engine imports lazily on its first run: peft (when the library checks for a peft model)
    # and, through DeepSpeed's optimizer check, the Muon optimizer module (which imports torch.compile's stack)
    for name in ("peft", "deepspeed.runtime.zero.muon.muon_optimizer"):
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    opts = dict(load_config(RECIPE, overrides(a, a.work / "reference", "never", cuda=False)).builtin_data or {})
    ensure_builtin_dataset(opts.pop("root"), **opts)


def wait_for_go(path: Path, wait_s: float) -> bool:
    """Block until the launcher writes ``go`` (True) or ``stop`` / nothing within ``wait_s`` (False)."""
    end = time.perf_counter() + wait_s
    while time.perf_counter() < end:
        if path.is_file() and (word := path.read_text().strip()):
            return word == "go"
        time.sleep(0.05)
    return False


def worker(argv: list[str] | None = None) -> int:
    """Entry point under torchrun: prewarm (with ``--go``), then the reference run and the resumed run."""
    p = argparse.ArgumentParser(description="GPU suite part 3 worker (run under torchrun)")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--go", type=Path, default=None, help="prewarm, then wait for 'go' in this file")
    p.add_argument("--wait-s", type=float, default=3600.0)
    p.add_argument("--clips", type=int, default=96, help="training clips (one epoch)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--save-at", type=int, default=15)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--data-workers", type=int, default=2, help="processes generating the data set")
    p.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers")
    a = p.parse_args(argv)
    out: dict[str, Any] = {"save_at": a.save_at}
    if a.go is not None:
        t0 = time.perf_counter()
        prewarm(a)
        out["prewarm_s"] = time.perf_counter() - t0
        a.json.write_text(json.dumps(out))
        if not wait_for_go(a.go, a.wait_s):
            return 0
    out["reference"] = run_one(a, "reference", "never")
    a.json.write_text(json.dumps(out))
    tag = f"step_{a.save_at:08d}"
    out["resume_from"] = tag
    out["resume"] = run_one(a, "resumed", str(a.work / "reference" / "checkpoints" / tag))
    a.json.write_text(json.dumps(out))
    return 0


# -- launcher (in the suite's process) -------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EngineJob:
    """The worker under ``torchrun --nproc_per_node 1``, started early: it imports and generates its data
    while part 1 runs (CPU only, nothing on the device), then waits; :meth:`run` lets it train."""

    def __init__(self, opts: dict[str, Any], work: Path, smoke: bool, wait_s: float) -> None:
        import inti_adapters

        work.mkdir(parents=True, exist_ok=True)
        self.json, self.log, self.go = work / "engine.json", work / "engine.log", work / "go"
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/inti_adapters/torch_extensions"))
        package_root = str(Path(inti_adapters.__file__).resolve().parent.parent)  # the library this process uses
        env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
        if smoke:
            env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(HERE / "_gpu_engine.py"), "--json", str(self.json),
               "--work", str(work), "--go", str(self.go), f"--wait-s={wait_s:g}", *[f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]]
        self.started = time.perf_counter()
        with open(self.log, "w") as logf:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)

    def _kill(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # torchrun and its worker: the group this job started
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def run(self, timeout_s: float) -> tuple[dict[str, Any], str, float]:
        """Say go and wait up to ``timeout_s``: ``(the worker's JSON so far, log tail, seconds after go)``."""
        self.go.write_text("go")
        start = time.perf_counter()
        try:
            rc: int | None = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._kill()
            rc = None
        data = json.loads(self.json.read_text()) if self.json.is_file() else {}
        data["returncode"] = rc
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.is_file() else ""
        return data, tail, time.perf_counter() - start

    def cancel(self) -> None:
        """Tell a waiting worker to exit without training (and make sure it does)."""
        self.go.write_text("stop")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=20)
        self._kill()


def summarise(data: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """Loss fell? Resume reproduced the step and the loss? Step time. ``{}`` entries when not measured."""
    from statistics import median

    out: dict[str, Any] = {}
    ref = data.get("reference")
    if not ref or not ref["history"]:
        return out
    losses = [v for _, v in ref["history"]]
    out["steps"] = ref["final_step"]
    k = max(2, len(losses) // 6)
    out["loss_first"], out["loss_last"] = sum(losses[:k]) / k, sum(losses[-k:]) / k
    out["loss_window"] = k
    out["loss_fell"] = out["loss_last"] < out["loss_first"]
    gaps = [b - a for a, b in zip(ref["step_ends"], ref["step_ends"][1:], strict=False)][1:]  # drop the first step
    out["step_s"] = median(gaps) if gaps else None
    out["clips_per_s"] = ref["global_batch"] / out["step_s"] if out["step_s"] else None
    res = data.get("resume")
    if res is None:
        return out
    save_at, ref_by_step = data["save_at"], dict((s, v) for s, v in ref["history"])
    first_step = res["history"][0][0] if res["history"] else None
    out["resumed_first_step"], out["resumed_final_step"] = first_step, res["final_step"]
    out["step_reproduced"] = first_step == save_at + 1 and res["final_step"] == ref["final_step"]
    diffs = [abs(v - ref_by_step[s]) for s, v in res["history"] if s in ref_by_step]
    out["loss_tol"] = 2e-2 if cuda else 1e-5  # GPU kernels (flash backward, cuDNN conv) are not bitwise deterministic
    out["loss_max_diff"] = max(diffs) if diffs else None
    out["loss_first_diff"] = diffs[0] if diffs else None
    out["loss_reproduced"] = bool(diffs) and len(diffs) == len(res["history"]) and max(diffs) <= out["loss_tol"]
    return out


if __name__ == "__main__":
    code = worker()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the JSON is written; skip the slow interpreter teardown (torch, DeepSpeed, peft)
