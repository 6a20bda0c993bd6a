"""What the cluster tests share: a tiny built-in digits data set, a recipe on it, launch commands,
and readers of a run's sample log and step losses."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

from inti_adapters.recipes import RECIPES_DIR

# 48 training clips of 4 frames 32x32 in 4 frame shards; 2 ranks x 4 clips = 6 steps per epoch
DIGITS = dict(num_train=48, num_val=8, num_frames=4, image_size=32, digit_size=16, samples_per_shard=12,
              store="frames", workers=1)
SHARDS = "train/digits-train-{000000..000003}.tar"
SAMPLES = 48
EPOCHS = 2
STEPS_PER_EPOCH = 6
DIST_TIMEOUT_S = 20
PEER_LOST = ("a peer was lost", "PeerLostError")

_DATA: dict[str, Path] = {}


def digits_root(base: Path) -> Path:
    """The data set, generated once per test session (the first caller's ``base``)."""
    if "root" not in _DATA:
        from inti_adapters.data import ensure_builtin_dataset

        root = base / "digits"
        ensure_builtin_dataset(root, **DIGITS)
        _DATA["root"] = root
    return _DATA["root"]


def write_recipe(path: Path, shards: str, num_workers: int = 1, **train: object) -> Path:
    """A recipe on the digits recipe: a tiny ViT, the given shards, the sample log on, short collective timeout."""
    train = {"epochs": EPOCHS, "global_batch_size": 8, "eval_every_epochs": 0, "save_every": 2, "log_every": 1,
             "progress": False, "tensorboard": False, "sample_log": True, "dist_timeout_s": DIST_TIMEOUT_S,
             **train}
    lines = [
        f"base: {RECIPES_DIR / 'digits_cpu.yaml'}",
        "model:",
        "  model_kwargs: {img_size: 32, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2, class_token: true,"
        " global_pool: token}",
        "  layers: [1]",
        "  num_classes: 40",
        "builtin_data: null",
        "data:",
        f"  train_shards: {json.dumps(shards)}",
        "  num_frames: 4",
        "  crop_size: 32",
        "  batch_size: 4",
        f"  num_workers: {num_workers}",
        "train:",
        *(f"  {k}: {json.dumps(v)}" for k, v in train.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def launcher() -> list[str]:
    """``torchrun`` of this Python environment."""
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def train_env() -> dict[str, str]:
    """The environment of a launched node: ours, minus any launcher variables, one thread per process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/inti_adapters/torch_extensions"))
    return env


def sample_log(out: Path) -> dict[int, list[dict]]:
    """``{rank: [line, ...]}`` of ``out/samples/rank*.jsonl``, in file order."""
    logs = {}
    for path in sorted((out / "samples").glob("rank*.jsonl")):
        logs[int(path.stem[4:])] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return logs


def final_keys(out: Path) -> dict[tuple[int, int, int], list[str]]:
    """``{(rank, epoch, step): keys}``, the last line of each step (a resumed run re-does steps)."""
    return {(rank, e["epoch"], e["step"]): e["keys"] for rank, lines in sample_log(out).items() for e in lines}


def last_step(out: Path) -> int:
    """The highest step any rank has logged so far (0 before the first)."""
    steps = [e["step"] for lines in sample_log(out).values() for e in lines]
    return max(steps, default=0)


def step_losses(out: Path) -> dict[int, float]:
    """``{step: loss}`` of the training rows of ``metrics.csv`` (the last row of a step re-done after a resume)."""
    with open(out / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["split"] == "train"}


def wait_exit(procs, timeout: float) -> float:
    """Wait for every process (bounded); returns the seconds it took. Raises TimeoutError naming the ones left."""
    start = time.monotonic()
    for p in procs:
        left = timeout - (time.monotonic() - start)
        try:
            p.wait(timeout=max(left, 0.1))
        except Exception:
            raise TimeoutError(f"{p.args[-6:]} still running after {timeout:.0f} s") from None
    return time.monotonic() - start


def explain(text: str, tail: int = 2500) -> str:
    """A failed launch's output cut to what says why: its error lines, then its end."""
    errors = [line for line in text.splitlines()
              if ("Error" in line or "error:" in line) and "frame #" not in line and "elastic/errors" not in line]
    return "error lines:\n" + "\n".join(errors[:40]) + f"\n... last {tail} characters:\n" + text[-tail:]
