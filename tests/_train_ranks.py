"""Ranks of a tiny training run as separate processes on loopback (``RANK``/``WORLD_SIZE`` set as torchrun
sets them), so that a test can signal or kill each rank and read its exit status; readers of what the run
trained (sample log, step losses). Shared by the preemption / lost-peer / world-size tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from _cluster import train_env

from inti_adapters.train.metrics import read_metrics
from inti_adapters.train.samples import read_sample_log

SAMPLES = 32  # synthetic clips per epoch; global batch 8 -> 4 steps per epoch on 1 or 2 ranks
EPOCHS = 2

WORKER = textwrap.dedent('''
    import json, os, sys, time
    import torch
    torch.set_num_threads(1)
    from inti_adapters.train import PeerLostError, SyntheticVideoLoader, Trainer, load_config

    out, extra = sys.argv[1], json.loads(sys.argv[2])
    slow_after = int(os.environ.get("SLOW_AFTER", "0"))

    class Run(Trainer):
        def on_step_end(self, step, loss):
            if slow_after and step >= slow_after:
                open(os.path.join(out, f"at_step{step}_rank{self.dist.rank}"), "w").close()
                time.sleep(float(os.environ.get("SLOW_S", "0.6")))

    class WithWorkers(SyntheticVideoLoader):
        """The same batches, produced by a torch DataLoader worker process (WORKERS=1)."""

        def __iter__(self):
            parent = super().__iter__

            class Batches(torch.utils.data.IterableDataset):
                def __iter__(self):
                    return parent()
            return iter(torch.utils.data.DataLoader(Batches(), batch_size=None, num_workers=1))

    def factory(train, rank, world_size, epoch):
        cls = WithWorkers if train and os.environ.get("WORKERS") == "1" else SyntheticVideoLoader
        return cls(num_samples=%(samples)d if train else 4, num_classes=4, num_frames=4, size=32,
                                    batch_size=2, train=train, rank=rank, world_size=world_size, epoch=epoch,
                                    with_keys=train)

    kw = '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2, "depth": 2}'
    cfg = load_config(None, [
        "model.name=vit_base_patch16_clip_224", "model.model_kwargs=" + kw, "model.layers=[1]",
        "model.num_classes=4", "train.output_dir=" + out, "train.epochs=%(epochs)d", "train.zero_stage=2",
        "train.global_batch_size=8", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
        "train.eval_every_epochs=0", "train.save_every=0", "train.sample_log=true", "optim.lr=3e-3",
        "optim.warmup_steps=1", "data.batch_size=2", *extra])
    try:
        Run(cfg, loader_factory=factory).fit()
    except PeerLostError as e:  # what inti-train prints: one line, non-zero status
        print(f"inti-train: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1)  # as inti-train does (no os._exit: the exit itself must not hang)
    import torch.distributed as dist
    dist.destroy_process_group()
''') % {"samples": SAMPLES, "epochs": EPOCHS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, world: int, *overrides: str, env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start ``world`` ranks of the worker on loopback; their output goes to ``out/log_rank{r}_{n}.txt``."""
    out.mkdir(parents=True, exist_ok=True)
    script = out.parent / "_worker.py"
    if not script.exists():
        script.write_text(WORKER)
    port, procs = free_port(), []
    stamp = time.monotonic_ns()
    for rank in range(world):
        e = {**train_env(), **(env or {}), "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        log = open(out / f"log_rank{rank}_{stamp}.txt", "w")
        procs.append(subprocess.Popen([sys.executable, str(script), str(out), json.dumps(list(overrides))], env=e,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
    return procs


def wait(procs: list[subprocess.Popen], timeout: float = 120) -> list[int]:
    """Exit statuses; every rank still running after ``timeout`` is killed (the test then fails on its status)."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            codes.append(p.wait())
    return codes


def run(out: Path, world: int, *overrides: str, timeout: float = 120) -> list[int]:
    return wait(launch(out, world, *overrides), timeout)


def logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("log_rank*.txt")))


def wait_for(path_glob: str, out: Path, procs: list[subprocess.Popen], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not list(out.glob(path_glob)):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError(f"no {path_glob} under {out}\n{logs(out)}")
        time.sleep(0.05)


def trained(out: Path, world: int) -> dict[int, list[dict]]:
    """What each rank finally trained on (re-done steps resolved)."""
    return {r: read_sample_log(out / "samples" / f"rank{r}.jsonl") for r in range(world)}


def epoch_keys(out: Path, world: int, epoch: int) -> list[str]:
    return [k for lines in trained(out, world).values() for line in lines if line["epoch"] == epoch
            for k in line["keys"]]


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.csv") if r["split"] == "train"]
