"""Metrics on global rank 0: a CSV file (always), TensorBoard (when it is installed; in the ``train``
extra) and Weights & Biases (``train.wandb``: the keyword arguments of ``wandb.init``)."""

from __future__ import annotations

import csv
import logging
import os
import secrets
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FIELDS = ("step", "epoch", "split", "loss", "lr", "clips_per_s", "top1", "top5")


class MetricsLogger:
    """Append rows to ``<out>/metrics.csv`` and mirror scalars to TensorBoard.

    On resume from step ``s``, rows written after ``s`` by the interrupted run are dropped, so
    the file holds one continuous curve.
    """

    def __init__(self, out_dir: str | os.PathLike, *, enabled: bool, tensorboard: bool = True,
                 resume_step: int | None = None, wandb: dict[str, Any] | None = None,
                 config: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.csv"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and resume_step is not None:
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            self._write(rows, mode="w")
        elif not self.path.exists() or resume_step is None:
            self._write([], mode="w")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("tensorboard is not installed; metrics go to %s only", self.path)
            else:
                self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"), purge_step=resume_step)
        if wandb is not None:
            self._wandb = start_wandb(Path(out_dir), wandb, config)

    def _write(self, rows: list[dict[str, Any]], mode: str) -> None:
        with open(self.path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)

    def log(self, step: int, epoch: int, split: str, **values: float) -> None:
        """One row; ``values`` are any of loss, lr, clips_per_s, top1, top5."""
        if not self.enabled:
            return
        unknown = set(values) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; known: {FIELDS[3:]}")
        self._write([{"step": step, "epoch": epoch, "split": split, **values}], mode="a")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{split}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in values.items()} | {"epoch": epoch}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def start_wandb(out_dir: Path, options: dict[str, Any], config: dict[str, Any] | None) -> Any:
    """``wandb.init(**options)`` with the run's folder under ``out_dir`` (``wandb/``) and the recipe as its config;
    without an ``id`` in ``options`` the run's id is kept in ``out_dir/wandb_run_id``, so a resumed run logs to the
    same W&B run. ``wandb`` missing is an error naming the key (it was asked for)."""
    try:
        import wandb
    except ImportError:
        raise ImportError("train.wandb is set but wandb is not installed: pip install 'inti-adapters[wandb]' "
                          "(or wandb), or set train.wandb=null") from None
    kwargs = {"dir": str(out_dir), "config": config, **options}
    Path(kwargs["dir"]).mkdir(parents=True, exist_ok=True)
    if "id" not in options:  # one W&B run per output folder: a resumed run continues it
        id_file = out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        kwargs.update(id=run_id, resume=options.get("resume", "allow"))
    try:
        return wandb.init(**kwargs)
    except TypeError as e:
        raise ValueError(f"train.wandb: {e} (its keys are the keyword arguments of wandb.init)") from None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics CSV with numbers parsed (empty cells -> None)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        parsed: dict[str, Any] = {}
        for k, v in r.items():
            if k == "split":
                parsed[k] = v
            elif v in ("", None):
                parsed[k] = None
            else:
                parsed[k] = int(v) if k in ("step", "epoch") else float(v)
        out.append(parsed)
    return out
