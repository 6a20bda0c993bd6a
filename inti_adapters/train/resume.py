"""Where a resumed run starts: the checkpoint's recipe compared with this run's, and the data position."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, compare_recipes

logger = logging.getLogger(__name__)

FIXED_FACTS = ("num_classes", "num_frames", "crop_size")  # a resume that changes them is refused


@dataclass
class Position:
    """Where a run (re)starts, and what its first epoch had done before the checkpoint."""

    step: int = 0
    epoch: int = 0
    micro: int = 0  # micro-batches of the epoch already trained on (in this run's micro-batches)
    resumed: bool = False
    replay: bool = False  # read (decode) those micro-batches instead of skipping them undecoded
    loss_sum: float = 0.0  # the epoch's summed step losses before the checkpoint (all ranks, on rank 0)
    steps: int = 0
    exclude: list[str] | None = None  # keys trained in the epoch before the checkpoint: excluded, not skipped
    inherited: list[str] = field(default_factory=list)  # keys of the epoch before this run (rank 0 carries them)


@dataclass
class Reconciled:
    cfg: Config
    notes: list[str]


def reconcile_recipe(cfg: Config, meta: dict[str, Any] | None, where: Path, facts: dict[str, Any],
                     is_main: bool) -> Reconciled:
    """Refuse a resume whose recipe changes the model, the data set or the data shape; keep or apply the
    rest (noted)."""
    if meta is None:
        if is_main:
            logger.warning("%s has no recipe record (an older checkpoint): the recipe is not compared", where)
        return Reconciled(cfg, [])
    changes = compare_recipes(meta["recipe"], cfg)
    saved_facts = meta.get("facts", {})
    refused = changes.refused + [f"{k} (resolved): {saved_facts[k]!r} in the checkpoint, {v!r} now"
                                 for k, v in facts.items() if k in FIXED_FACTS and k in saved_facts
                                 and saved_facts[k] != v]
    if refused:
        raise ConfigError(f"cannot resume from {where} with this recipe; it changes what the checkpoint's weights, "
                          f"optimizer state or data position belong to: {'; '.join(refused)}. Use the checkpoint's "
                          "values, or start a new run (train.resume=never or another train.output_dir)")
    step = meta.get("step", "?")
    moved = [f"{k} (resolved): {saved_facts[k]!r} in the checkpoint, {v!r} now" for k, v in facts.items()
             if k in ("micro_batch", "world_size") and k in saved_facts and saved_facts[k] != v]
    new = ([f"resumed at step {step}: {c}; the checkpoint's value stays in force (the optimizer, its learning-"
            "rate schedule and the RNG are restored from it)" for c in changes.kept]
           + [f"resumed at step {step}: {c}; the new value applies from step {step} on, so the run no longer "
              "matches an uninterrupted one" for c in changes.applied]
           + [f"resumed at step {step}: {c}; same global batch, schedule and step count, the rest of the epoch "
              "trains each remaining sample once (float sums are reduced in another order)" for c in moved])
    for note in new if is_main else ():
        logger.warning("%s", note)
    return Reconciled(Config.from_dict(changes.effective), list(meta.get("notes", [])) + new)


def data_position(state: dict[str, Any], *, micro_batch: int, world_size: int, is_main: bool,
                  epoch_keys: list[str] | None) -> Position:
    """The position to resume at from a checkpoint's loop state.

    Same world size and micro-batch (and an epoch not itself resumed by exclusion): skip the epoch's
    first micro-batches, exactly as before. Otherwise, with the keys the checkpoint's ranks trained in the
    epoch (``epoch_keys``), exclude them so every remaining sample trains once; without keys, fall back to
    skipping as many samples as were trained (the split by rank differs: samples may repeat or be missed).
    """
    micro = state["micro_in_epoch"]
    old = (state.get("micro_batch", micro_batch), state.get("world_size", world_size))
    same = old == (micro_batch, world_size)
    if not same:  # the same samples per step: micro-batches of this run
        micro = micro * old[0] * old[1] // (micro_batch * world_size)
    excluded = bool(state.get("excluded_in_epoch"))
    pos = Position(state["step"], state["epoch"], micro, resumed=True,
                   replay=bool(state.get("corrupt_in_epoch", 0)) and micro > 0 and same and not excluded,
                   loss_sum=float(state.get("epoch_loss_sum", 0.0)) if is_main else 0.0,
                   steps=int(state.get("epoch_steps", 0)) if is_main else 0)
    if micro and (excluded or not same):
        if epoch_keys is not None:
            pos.exclude = epoch_keys
            pos.inherited = epoch_keys if is_main else []
        elif is_main:
            logger.warning("resuming mid-epoch at another world size without the sample keys of the epoch (a "
                           "loader without keys): skipping %d micro-batches per rank instead; samples of the rest "
                           "of this epoch may repeat or be missed", micro)
    return pos
