"""Which samples each rank trained on: the per-step sample log and the keys of the current epoch.

``train.sample_log: true`` writes ``OUTPUT_DIR/samples/rank{R}.jsonl`` (R the global rank), one line
per optimizer step: ``{"epoch": E, "step": S, "keys": [...]}`` with the ``__key__`` of every sample
the rank trained on in that step, in order. A resumed run appends, so the steps it re-does after
the resume point appear again: the lines after the last line of a step ``<= resume step``
supersede the earlier ones (:func:`read_sample_log` returns what a run finally trained on).

The keys of the current epoch are also kept in memory (:class:`EpochKeys`) and saved with each
checkpoint, which is how a run resumed on another number of ranks knows what is left of the epoch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SAMPLES_DIR = "samples"
KEYS_FILE = "epoch_keys_rank{rank}.json"


class SampleLog:
    """Appends this rank's lines; a no-op when disabled."""

    def __init__(self, out_dir: str | os.PathLike, rank: int, *, enabled: bool) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / SAMPLES_DIR / f"rank{rank}.jsonl"
        self._pending: list[str] = []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, keys: list[str] | None) -> None:
        if self.enabled and keys is not None:
            self._pending.extend(keys)

    def step(self, epoch: int, step: int) -> None:
        """Write the step's line (the keys added since the previous step)."""
        if not self.enabled:
            return
        line = json.dumps({"epoch": epoch, "step": step, "keys": self._pending})
        self._pending = []
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()


class EpochKeys:
    """Keys this rank trained on in the current epoch, plus those inherited from the checkpoint."""

    def __init__(self) -> None:
        self.epoch = -1
        self.mine: list[str] = []
        self.inherited: list[str] = []  # trained before the resume (all ranks), when known
        self.complete = True  # False once a batch came without keys

    def start(self, epoch: int, inherited: list[str] | None = None) -> None:
        self.epoch, self.mine, self.inherited, self.complete = epoch, [], list(inherited or []), True

    def add(self, keys: list[str] | None) -> None:
        if keys is None:
            self.complete = False
        else:
            self.mine.extend(keys)

    def state(self, rank: int) -> dict[str, Any]:
        """What this rank writes into a checkpoint (rank 0 also carries the inherited keys)."""
        keys = self.mine + (self.inherited if rank == 0 else [])
        return {"epoch": self.epoch, "complete": self.complete, "keys": keys}


def save_epoch_keys(directory: Path, rank: int, keys: EpochKeys) -> Path:
    path = directory / KEYS_FILE.format(rank=rank)
    path.write_text(json.dumps(keys.state(rank)) + "\n")
    return path


def load_epoch_keys(directory: Path, world_size: int, epoch: int) -> list[str] | None:
    """The keys every rank of the checkpoint had trained on in ``epoch``; None when they are not all known."""
    out: list[str] = []
    for rank in range(world_size):
        path = directory / KEYS_FILE.format(rank=rank)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("epoch") != epoch or not record.get("complete"):
            return None
        out.extend(str(k) for k in record.get("keys", []))
    return out


def read_sample_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of one rank's log with re-done steps resolved: a line for step S replaces every earlier
    line for a step >= S (a resume re-does them), so the result is what the run finally trained on."""
    lines: list[dict[str, Any]] = []
    with open(path) as f:
        for raw in f:
            if not raw.strip():
                continue
            record = json.loads(raw)
            while lines and lines[-1]["step"] >= record["step"]:
                lines.pop()
            lines.append(record)
    return lines
