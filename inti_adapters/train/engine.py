"""The DeepSpeed training loop behind ``inti-train``.

One code path for every launch: ``deepspeed`` (multi-node via a hostfile), ``torchrun``, or a
lone process; NCCL on GPUs, gloo on CPU. The loop normalises uint8 clips on the device, steps
DeepSpeed (ZeRO 0-3, bf16, accumulation, clipping), checkpoints every ``save_every`` steps,
resumes exactly (weights, optimizer, scheduler, step, data position, RNG), logs to tqdm / CSV /
TensorBoard and exports the adapter with ``save_pretrained`` at the end.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data import DataConfig, build_dataloader, ensure_builtin_dataset
from ..video import normalize_video
from .build import build_model
from .checkpoint import CheckpointManager, export_adapter, resolve_resume
from .config import Config, ConfigError, TrainLoopConfig, compare_recipes
from .distributed import DistInfo, all_reduce_max, all_reduce_sum, barrier, setup_distributed
from .evaluate import EvalResult, evaluate
from .metrics import MetricsLogger
from .optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

# (train, rank, world_size, epoch) -> loader with set_epoch() and skip_batches(); None = no such split
LoaderFactory = Callable[[bool, int, int, int], Any]
_FIXED_FACTS = ("num_classes", "num_frames", "crop_size")  # a resume that changes them is refused
_RESERVED_DS_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                     "gradient_clipping")


def deepspeed_config(train: TrainLoopConfig, micro_batch: int, grad_accum: int) -> dict[str, Any]:
    """The DeepSpeed config: the recipe's JSON (ZeRO tuning) + batch, clipping, stage, bf16 from YAML."""
    ds: dict[str, Any] = {}
    if train.deepspeed_config:
        path = Path(train.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed_config: no such file {path}")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"train.deepspeed_config: {path} is not valid JSON: {e.msg} at line {e.lineno}, "
                              f"column {e.colno}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"train.deepspeed_config: cannot read {path}: {e}") from None
        if not isinstance(ds, dict):
            raise ConfigError(f"train.deepspeed_config: {path} must hold a JSON object, got {type(ds).__name__}")
    if isinstance(ds.get("checkpoint"), dict) and ds["checkpoint"].get("load_universal"):
        raise ConfigError(f"{train.deepspeed_config} sets checkpoint.load_universal: DeepSpeed reads universal "
                          "checkpoints with unrestricted unpickling, which resume refuses; remove it")
    for key in _RESERVED_DS_KEYS:
        if ds.get(key, "auto") != "auto":
            raise ConfigError(f"{train.deepspeed_config} sets {key}={ds[key]!r}; batch sizes and clipping come "
                              f"from the recipe (data.batch_size, train.grad_accum / global_batch_size, "
                              f"train.clip_grad): use \"auto\" or leave it out")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{train.deepspeed_config} defines '{key}'; the recipe's optim section builds "
                              f"them (AdamW + warm-up cosine): remove it from the JSON")
    ds.pop("train_batch_size", None)
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = grad_accum
    ds["gradient_clipping"] = float(train.clip_grad or 0.0)
    zero = ds.setdefault("zero_optimization", {})
    if train.zero_stage is not None:
        zero["stage"] = train.zero_stage
    zero.setdefault("stage", 0)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bool(train.bf16)}
    if train.bf16 and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{train.deepspeed_config} enables fp16 while train.bf16 is true; pick one")
    ds.setdefault("zero_allow_untested_optimizer", True)  # torch AdamW as the client optimizer
    ds.setdefault("steps_per_print", 2**31 - 1)  # the loop logs itself
    return ds


@dataclass
class DataSetup:
    """The recipe's data: loader factory, resolved ``DataConfig`` and the built-in set's class count."""

    factory: LoaderFactory
    data_config: Any
    num_classes: int | None


def real_data(cfg: Config, dist_info: DistInfo) -> DataSetup:
    """Loaders from ``inti_adapters.data`` for the recipe's ``data`` / ``builtin_data`` sections.

    With ``builtin_data``, rank 0 creates the data set first (once), then the other ranks open it.
    """
    num_classes = None
    if cfg.builtin_data is not None:
        opts = dict(cfg.builtin_data)
        root = Path(str(opts.pop("root"))).expanduser()
        dataset = None
        for turn in (0, 1):  # rank 0 writes the shards first, the others then find them
            if (turn == 0) == dist_info.is_main:
                dataset = ensure_builtin_dataset(root, **opts)
            barrier()
        data_cfg = dataset.to_data_config(**cfg.data)
        num_classes = int(dataset.num_classes)
    else:
        try:
            data_cfg = DataConfig(**cfg.data)
        except TypeError as e:
            raise ConfigError(f"data: {e}") from None

    def factory(train: bool, rank: int, world_size: int, epoch: int) -> Any:
        if not train and not getattr(data_cfg, "val_shards", None):
            return None
        return build_dataloader(data_cfg, train=train, rank=rank, world_size=world_size, epoch=epoch)

    return DataSetup(factory, data_cfg, num_classes)


def data_value(cfg: Config, data_cfg: Any, name: str, *default: Any) -> Any:
    """A data setting from the resolved ``DataConfig`` if there is one, else from the recipe's mapping."""
    if data_cfg is not None:
        return getattr(data_cfg, name)
    if name in cfg.data:
        return cfg.data[name]
    if default:
        return default[0]
    raise ConfigError(f"data.{name} is required")


@dataclass
class _Position:
    """Where a run (re)starts, and what its first epoch had done before the checkpoint."""

    step: int = 0
    epoch: int = 0
    micro: int = 0  # micro-batches of the epoch already trained on
    resumed: bool = False
    replay: bool = False  # read (decode) those micro-batches instead of skipping them undecoded
    loss_sum: float = 0.0  # the epoch's summed step losses before the checkpoint (all ranks, on rank 0)
    steps: int = 0


@dataclass
class TrainResult:
    """What a finished (or interrupted and returned) run reports."""

    step: int
    epoch: int
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, loss averaged over ranks)
    eval: EvalResult | None = None
    export_dir: Path | None = None
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step this call trained, data wait included


class Trainer:
    """Build everything from a :class:`Config` and run :meth:`fit`.

    Args:
        cfg: The recipe.
        loader_factory: ``(train, rank, world_size, epoch) -> loader``; defaults to
            ``inti_adapters.data.build_dataloader`` on the recipe's data section. A factory may
            return None for the eval split (no evaluation).
        num_classes: Overrides the class count (else ``model.num_classes`` or the built-in data set's).

    Subclass and override :meth:`on_step_end` to add callbacks.
    """

    def __init__(self, cfg: Config, *, loader_factory: LoaderFactory | None = None,
                 num_classes: int | None = None) -> None:
        self.cfg = cfg
        self.dist: DistInfo = setup_distributed(cfg.train.backend)
        self._data_cfg = None
        if loader_factory is None:
            data = real_data(cfg, self.dist)
            loader_factory, self._data_cfg = data.factory, data.data_config
            num_classes = num_classes or cfg.model.num_classes or data.num_classes
        self.loader_factory = loader_factory
        self.num_classes = num_classes or cfg.model.num_classes
        if not self.num_classes:
            raise ConfigError("model.num_classes is null and no built-in data set gives it; set model.num_classes")
        world = self.dist.world_size
        self.train_loader = self.loader_factory(True, self.dist.rank, world, 0)
        self.micro_batch = int(getattr(self.train_loader, "batch_size", None) or self._data_value("batch_size"))
        self.grad_accum = self._grad_accum(world)
        self.global_batch = self.micro_batch * world * self.grad_accum
        self.steps_per_epoch = cfg.train.steps_per_epoch or self._measure_epoch(world)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.out_dir = Path(cfg.train.output_dir).expanduser()
        self.engine: Any = None
        self._notes: list[str] = []  # what resumes changed in the recipe (recorded with the config)
        self._corrupt_at_epoch_start = 0

    def _data_value(self, name: str, *default: Any) -> Any:
        return data_value(self.cfg, self._data_cfg, name, *default)

    def _grad_accum(self, world: int) -> int:
        target = self.cfg.train.global_batch_size
        if target is None:
            return self.cfg.train.grad_accum
        if target % (self.micro_batch * world):
            raise ConfigError(f"train.global_batch_size={target} is not a multiple of data.batch_size x world size "
                              f"= {self.micro_batch} x {world}")
        return target // (self.micro_batch * world)

    def _measure_epoch(self, world: int) -> int:
        """Optimizer steps per epoch from the loader's length (the same on every rank)."""
        try:
            batches = -all_reduce_max([-len(self.train_loader)])[0]
        except TypeError:  # a loader without a length: fall back to the sample count
            samples = self._data_value("train_samples", None)
            if not samples:
                raise ConfigError("set train.steps_per_epoch or data.train_samples: the loader cannot tell "
                                  "the epoch length") from None
            batches = int(samples) // (self.micro_batch * world)
        if batches < self.grad_accum:
            raise ConfigError(f"an epoch has {batches} micro-batches per rank, fewer than one optimizer step "
                              f"of {self.grad_accum}; lower the batch size / accumulation or add data")
        return batches // self.grad_accum

    # -- setup --------------------------------------------------------------------------------
    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def setup(self) -> None:
        """Model, optimizer, schedule and DeepSpeed engine (called by :meth:`fit`)."""
        import deepspeed

        cfg = self.cfg
        self._seed(cfg.train.seed)  # identical initial weights on every rank
        model, self.mean_std = build_model(cfg.model, self.num_classes)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch=self.steps_per_epoch,
                                    total_steps=self.total_steps)
        ds_config = deepspeed_config(cfg.train, self.micro_batch, self.grad_accum)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False)
        self.zero_stage = int(ds_config["zero_optimization"]["stage"])
        self.dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
        self._seed(cfg.train.seed + 1000 * self.dist.rank + 1)  # per-rank randomness (drop path, ...)
        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", rank=self.dist.rank, keep_last=cfg.train.keep_last)

    def on_step_end(self, step: int, loss: float) -> None:
        """Called on every rank after each optimizer step; override for callbacks (no-op)."""

    # -- loop ---------------------------------------------------------------------------------
    def _current_lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    def _corrupt_count(self) -> int:
        """Samples the train loader skipped as undecodable so far (loaders that do not count: 0)."""
        return int(getattr(self.train_loader, "corrupt_skipped", 0) or 0)

    def _facts(self) -> dict[str, Any]:
        """What the recipe resolved to in this run (compared on resume)."""
        return {"num_classes": self.num_classes, "num_frames": self._data_value("num_frames", None),
                "crop_size": self._data_value("crop_size", None), "global_batch": self.global_batch,
                "micro_batch": self.micro_batch, "world_size": self.dist.world_size}

    def _save(self, step: int, epoch: int, micro: int, loss_sum: float = 0.0, steps: int = 0) -> None:
        """Collective. Also records the epoch's loss so far and whether corrupt samples were skipped in it."""
        per_epoch = self.steps_per_epoch * self.grad_accum
        corrupt = self._corrupt_count() - self._corrupt_at_epoch_start
        loss_sum, steps, corrupt = all_reduce_sum([loss_sum, steps, corrupt])
        if micro >= per_epoch:  # the epoch is complete: resume at the start of the next one
            epoch, micro, loss_sum, steps, corrupt = epoch + 1, 0, 0.0, 0, 0
        state = {"step": step, "epoch": epoch, "micro_in_epoch": micro, "global_batch": self.global_batch,
                 "world_size": self.dist.world_size, "micro_batch": self.micro_batch, "epoch_loss_sum": loss_sum,
                 "epoch_steps": int(steps), "corrupt_in_epoch": int(corrupt)}
        meta = {"step": step, "recipe": self.cfg.to_dict(), "facts": self._facts(), "notes": self._notes}
        self.ckpt.save(self.engine, step, state, meta=meta)
        self._last_saved = step

    def _evaluate(self) -> EvalResult | None:
        loader = self.loader_factory(False, self.dist.rank, self.dist.world_size, 0)
        if loader is None:
            return None
        with torch.random.fork_rng(devices=[]):  # off the training RNG (a DataLoader draws a seed from it)
            return evaluate(self.engine, loader, device=self.engine.device, mean_std=self.mean_std, dtype=self.dtype,
                            clips_per_forward=self.cfg.eval.clips_per_forward, max_batches=self.cfg.eval.max_batches,
                            lockstep=self.zero_stage == 3, average_clips=self.cfg.eval.average_clips,
                            num_crops=self._data_value("num_crops", 1))

    def _resume(self) -> _Position:
        """Load the checkpoint ``train.resume`` points to (after comparing its recipe with this run's)."""
        found = resolve_resume(self.cfg.train.resume, self.out_dir / "checkpoints")
        if found is None:
            return _Position()
        root, tag = found
        manager = CheckpointManager(root, rank=self.dist.rank)
        self._reconcile_recipe(manager.read_meta(tag), root / tag)
        state = manager.load(self.engine, tag)
        if state.get("global_batch") != self.global_batch:
            raise ConfigError(f"checkpoint {root / tag} was written with global batch {state.get('global_batch')}, "
                              f"this run has {self.global_batch}: the data position would not match")
        micro, old = state["micro_in_epoch"], (state.get("micro_batch", self.micro_batch), state.get("world_size"))
        if old[1] is not None and old != (self.micro_batch, self.dist.world_size):  # same samples per step
            micro = micro * old[0] * old[1] // (self.micro_batch * self.dist.world_size)
        pos = _Position(state["step"], state["epoch"], micro, resumed=True,
                        replay=bool(state.get("corrupt_in_epoch", 0)) and micro > 0,
                        loss_sum=float(state.get("epoch_loss_sum", 0.0)) if self.dist.is_main else 0.0,
                        steps=int(state.get("epoch_steps", 0)) if self.dist.is_main else 0)
        if self.dist.is_main:
            logger.info("resumed from %s: step %d, epoch %d, micro-batch %d", root / tag, pos.step, pos.epoch, micro)
            if pos.replay:
                logger.info("corrupt samples were skipped in this epoch before the checkpoint: re-reading its first "
                            "%d micro-batches (decoded, not trained on) so that the next batches are exact", micro)
        return pos

    def _reconcile_recipe(self, meta: dict[str, Any] | None, where: Path) -> None:
        """Refuse a resume whose recipe changes the model or the data shape; keep or apply the rest (noted)."""
        if meta is None:
            if self.dist.is_main:
                logger.warning("%s has no recipe record (an older checkpoint): the recipe is not compared", where)
            return
        changes = compare_recipes(meta["recipe"], self.cfg)
        saved_facts, facts = meta.get("facts", {}), self._facts()
        refused = changes.refused + [f"{k} (resolved): {saved_facts[k]!r} in the checkpoint, {v!r} now"
                                     for k, v in facts.items() if k in _FIXED_FACTS and k in saved_facts
                                     and saved_facts[k] != v]
        if refused:
            raise ConfigError(f"cannot resume from {where} with this recipe; it changes what the checkpoint's weights "
                              f"and optimizer state belong to: {'; '.join(refused)}. Use the checkpoint's values, "
                              "or start a new run (train.resume=never or another train.output_dir)")
        step = meta.get("step", "?")
        moved = [f"{k} (resolved): {saved_facts[k]!r} in the checkpoint, {v!r} now" for k, v in facts.items()
                 if k in ("micro_batch", "world_size") and k in saved_facts and saved_facts[k] != v]
        new = ([f"resumed at step {step}: {c}; the checkpoint's value stays in force (the optimizer, its learning-"
                "rate schedule and the RNG are restored from it)" for c in changes.kept]
               + [f"resumed at step {step}: {c}; the new value applies from step {step} on, so the run no longer "
                  "matches an uninterrupted one" for c in changes.applied + moved])
        for note in new if self.dist.is_main else ():
            logger.warning("%s", note)
        self._notes = list(meta.get("notes", [])) + new
        self.cfg = Config.from_dict(changes.effective)

    def fit(self) -> TrainResult:
        """Train to the end (resuming first when a checkpoint exists); returns the run's summary."""
        from tqdm.auto import tqdm

        if self.engine is None:
            self.setup()
        rank0 = self.dist.is_main
        start = self._resume()
        cfg, step = self.cfg, start.step  # the recipe as the resume reconciled it
        self._last_saved = step
        if rank0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cfg.dump(self.out_dir / "config.yaml", notes=self._notes)
        self._metrics = MetricsLogger(self.out_dir, enabled=rank0, tensorboard=cfg.train.tensorboard,
                                      resume_step=step if start.resumed else None)
        # disable=None: a bar on a terminal only; a log file gets the epoch lines, not carriage-return updates
        self._bar = tqdm(total=self.total_steps, initial=step, disable=None if rank0 and cfg.train.progress else True,
                         desc="train", dynamic_ncols=True)
        result = TrainResult(step=step, epoch=start.epoch)
        self.engine.train()
        try:
            for epoch in range(start.epoch, cfg.train.epochs):
                if step >= self.total_steps:
                    break
                t0 = time.perf_counter()
                first = start if epoch == start.epoch else _Position(step, epoch)
                step, loss_sum, steps, trained = self._train_epoch(epoch, step, first, result)
                result.step, result.epoch = step, epoch + 1
                summary = self._epoch_summary(epoch, loss_sum, steps, trained, time.perf_counter() - t0, step)
                if cfg.train.eval_every_epochs and (epoch + 1) % cfg.train.eval_every_epochs == 0:
                    ev = self._evaluate()
                    if ev is not None:
                        result.eval = ev
                        self._metrics.log(step, epoch, "val", loss=ev.loss, top1=ev.top1, top5=ev.top5)
                        summary += f" | val {ev.summary()}"
                if rank0:
                    tqdm.write(summary)
            if self._last_saved != step:
                self._save(step, max(result.epoch - 1, 0), self.steps_per_epoch * self.grad_accum)
            result.export_dir = self.out_dir / "final"
            export_adapter(self.engine, result.export_dir)
            if rank0:
                cfg.dump(result.export_dir / "train_config.yaml", notes=self._notes)
        finally:
            self._bar.close()
            self._metrics.close()
        return result

    def _epoch_iterator(self, epoch: int, first: _Position) -> Any:
        """The train loader's iterator for ``epoch``, positioned after ``first.micro`` micro-batches."""
        loader = self.train_loader
        loader.set_epoch(epoch)
        self._corrupt_at_epoch_start = self._corrupt_count()
        if first.micro and not first.replay:
            loader.skip_batches(first.micro)  # skipped samples are not decoded
        # torch's DataLoader draws its base seed from the global RNG when an iterator is made: keep that draw
        # (and any reading) off the training RNG, which a resume restores as it was after the previous step
        with torch.random.fork_rng(devices=[]):
            it = iter(loader)
            for _ in range(first.micro if first.replay else 0):
                next(it, None)  # decoded and dropped: corrupt samples shift the batches as they did before
        return it

    def _train_epoch(self, epoch: int, step: int, first: _Position,
                     result: TrainResult) -> tuple[int, float, int, int]:
        """One epoch from micro-batch ``first.micro`` on; returns ``(step, summed step losses, steps, steps
        trained by this call)`` where the sums include the epoch's steps before a resume."""
        cfg, device = self.cfg, self.engine.device
        per_epoch = self.steps_per_epoch * self.grad_accum
        it, micro = self._epoch_iterator(epoch, first), first.micro
        loss_sum, steps, trained = first.loss_sum, first.steps, 0
        step_loss, window, t0 = 0.0, [0.0, 0], time.perf_counter()
        while micro < per_epoch and step < self.total_steps:
            batch = next(it, None)
            if all_reduce_max([int(batch is None)])[0]:  # all ranks stop together
                if self.dist.is_main:
                    logger.warning("epoch %d: the loader ran out after %d of %d micro-batches", epoch, micro, per_epoch)
                break
            video, label = batch
            x = normalize_video(video.to(device, non_blocking=True), self.mean_std, dtype=self.dtype)
            loss = F.cross_entropy(self.engine(x).float(), label.to(device), label_smoothing=cfg.train.label_smoothing)
            lr = self._current_lr()
            self.engine.backward(loss)
            self.engine.step()
            micro += 1
            step_loss += float(loss.detach()) / self.grad_accum
            if self.engine.global_steps == step:
                continue  # still accumulating
            step = self.engine.global_steps
            window = [window[0] + step_loss, window[1] + 1]
            loss_sum, steps, trained = loss_sum + step_loss, steps + 1, trained + 1
            seconds = time.perf_counter() - t0
            result.step_seconds.append(seconds)
            clips_s = self.global_batch / max(seconds, 1e-9)
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", clips_s=f"{clips_s:.1f}")
            if step % cfg.train.log_every == 0 or step == self.total_steps:
                total, count = all_reduce_sum(window)
                result.history.append((step, total / count))
                self._metrics.log(step, epoch, "train", loss=total / count, lr=lr, clips_per_s=clips_s)
                window = [0.0, 0]
            if cfg.train.save_every and step % cfg.train.save_every == 0:
                self._save(step, epoch, micro, loss_sum, steps)
            self.on_step_end(step, step_loss)
            step_loss, t0 = 0.0, time.perf_counter()
        return step, loss_sum, steps, trained

    def _epoch_summary(self, epoch: int, loss_sum: float, steps: int, trained: int, seconds: float, step: int) -> str:
        """The epoch's line: mean loss over all its steps (before a resume too), throughput of this process."""
        total, count = all_reduce_sum([loss_sum, steps])
        mean = total / max(count, 1)
        clips = trained * self.global_batch
        return (f"epoch {epoch + 1}/{self.cfg.train.epochs}: step {step}/{self.total_steps}  loss {mean:.4f}  "
                f"lr {self._current_lr():.3e}  {clips / max(seconds, 1e-9):.1f} clips/s  "
                f"{_fmt_time(seconds)}")


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(math.ceil(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def train(cfg: Config, **kwargs: Any) -> TrainResult:
    """``Trainer(cfg, **kwargs).fit()``."""
    return Trainer(cfg, **kwargs).fit()
