"""The DeepSpeed training loop behind ``inti-train``.

One code path for every launch: ``deepspeed`` (multi-node via a hostfile), ``torchrun``, or a
lone process; NCCL on GPUs, gloo on CPU. The loop normalises uint8 clips on the device, steps
DeepSpeed (ZeRO 0-3, bf16, accumulation, clipping), checkpoints every ``save_every`` steps,
resumes exactly (weights, optimizer, scheduler, step, data position, RNG), logs to tqdm / CSV /
TensorBoard / W&B and exports the adapter with ``save_pretrained`` at the end.

What a cluster adds (see the README's "Multi-node and clusters"): a checkpoint signal ends in a
checkpoint and exit status 75 (:mod:`.preemption`); a lost peer ends in :class:`PeerLostError`
within ``train.dist_timeout_s``; a non-finite loss in :class:`NonFiniteLossError`; the output
folder is locked (:mod:`.runlock`); a run resumes on another number of ranks (:mod:`.elastic`,
the epoch's trained sample keys excluded from the rest of the epoch); ``train.sample_log``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..video import normalize_video
from .build import build_model
from .checkpoint import CheckpointManager, export_adapter, resolve_resume
from .config import Config, ConfigError
from .distributed import DistInfo, all_reduce_max, all_reduce_sum, setup_distributed
from .ds_setup import DataSetup, LoaderFactory, data_value, deepspeed_config, real_data
from .elastic import needs_consolidated, save_consolidated
from .evaluate import EvalResult, evaluate
from .failures import NonFiniteLossError, PeerLostError, is_comm_failure, peer_lost
from .guards import NonFiniteGuard
from .metrics import MetricsLogger
from .optim import build_optimizer, build_scheduler
from .preemption import Preempted, SignalWatch, blocked_in_children, clear_marker, stop_children, write_marker
from .resume import Position, data_position, reconcile_recipe
from .runlock import RunLock, RunLockedError
from .samples import EpochKeys, SampleLog, load_epoch_keys, save_epoch_keys

__all__ = ["DataSetup", "LoaderFactory", "Trainer", "TrainResult", "data_value", "deepspeed_config", "real_data",
           "train"]

logger = logging.getLogger(__name__)


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
            ``inti_adapters.data.build_dataloader`` on the recipe's data section (train batches with
            their sample keys). A factory may return None for the eval split (no evaluation); its train
            batches may be ``(video, label)`` (no sample log, no key-based resume on another world size)
            or ``(video, label, keys)``.
        num_classes: Overrides the class count (else ``model.num_classes`` or the built-in data set's).

    Subclass and override :meth:`on_step_end` to add callbacks.
    """

    def __init__(self, cfg: Config, *, loader_factory: LoaderFactory | None = None,
                 num_classes: int | None = None) -> None:
        self.cfg = cfg
        self.dist: DistInfo = setup_distributed(cfg.train.backend, timeout_s=cfg.train.dist_timeout_s)
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
        self.out_dir = Path(cfg.train.output_dir).expanduser()
        self.train_loader = self.loader_factory(True, self.dist.rank, world, 0)
        self.micro_batch = int(getattr(self.train_loader, "batch_size", None) or self._data_value("batch_size"))
        self.grad_accum = self._grad_accum(world)
        self.global_batch = self.micro_batch * world * self.grad_accum
        self.steps_per_epoch = cfg.train.steps_per_epoch or self._checkpoint_epoch(world) or self._measure_epoch(world)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.engine: Any = None
        self._notes: list[str] = []  # what resumes changed in the recipe (recorded with the config)
        self._corrupt_at_epoch_start = 0
        self._keys = EpochKeys()
        self._workers: list[Any] = []  # loader workers forked with the checkpoint signals blocked
        self._phase, self._at_step = "setup", 0  # for the message of a lost peer
        self._signals = SignalWatch([])
        self._stop = False
        self._excluded_epoch = False

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

    def _checkpoint_epoch(self, world: int) -> int | None:
        """A resume at another world size keeps the checkpoint's steps per epoch (and so its schedule)."""
        found = resolve_resume(self.cfg.train.resume, self.out_dir / "checkpoints")
        if found is None:
            return None
        meta = CheckpointManager(found[0], rank=self.dist.rank).read_meta(found[1]) or {}
        state = meta.get("state") or {}
        if meta.get("facts", {}).get("world_size") in (None, world) or not state.get("steps_per_epoch"):
            return None
        return int(state["steps_per_epoch"])

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
        self.zero_stage = int(ds_config["zero_optimization"]["stage"])
        if cfg.train.max_nonfinite_steps and self.zero_stage == 3:
            raise ConfigError("train.max_nonfinite_steps > 0 needs ZeRO stage 0-2 (a skipped micro-batch's zero "
                              "gradient is built from the whole parameters); set it to 0 or use another stage")
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False)
        self.dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
        self._seed(cfg.train.seed + 1000 * self.dist.rank + 1)  # per-rank randomness (drop path, ...)
        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", rank=self.dist.rank, keep_last=cfg.train.keep_last)

    def on_step_end(self, step: int, loss: float) -> None:
        """Called on every rank after each optimizer step; override for callbacks (no-op)."""

    # -- state --------------------------------------------------------------------------------
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

    def _save(self, step: int, epoch: int, micro: int, loss_sum: float = 0.0, steps: int = 0) -> str:
        """Collective. Also records the epoch's loss so far, whether corrupt samples were skipped in it and
        the keys every rank trained on in it."""
        self._phase = "a checkpoint save"
        per_epoch = self.steps_per_epoch * self.grad_accum
        corrupt = self._corrupt_count() - self._corrupt_at_epoch_start
        loss_sum, steps, corrupt = all_reduce_sum([loss_sum, steps, corrupt])
        excluded = bool(self._keys.inherited) or self._excluded_epoch
        if micro >= per_epoch:  # the epoch is complete: resume at the start of the next one
            epoch, micro, loss_sum, steps, corrupt, excluded = epoch + 1, 0, 0.0, 0, 0, False
        state = {"step": step, "epoch": epoch, "micro_in_epoch": micro, "global_batch": self.global_batch,
                 "world_size": self.dist.world_size, "micro_batch": self.micro_batch, "epoch_loss_sum": loss_sum,
                 "epoch_steps": int(steps), "corrupt_in_epoch": int(corrupt), "steps_per_epoch": self.steps_per_epoch,
                 "excluded_in_epoch": excluded}
        meta = {"step": step, "recipe": self.cfg.to_dict(), "facts": self._facts(), "notes": self._notes,
                "state": state}

        def extra(directory: Path) -> None:
            save_epoch_keys(directory, self.dist.rank, self._keys)
            if needs_consolidated(self.engine):
                save_consolidated(self.engine, directory, rank=self.dist.rank, world_size=self.dist.world_size)

        tag = self.ckpt.save(self.engine, step, state, meta=meta, before_commit=extra)
        self._last_saved = step
        return tag

    def _evaluate(self) -> EvalResult | None:
        loader = self.loader_factory(False, self.dist.rank, self.dist.world_size, 0)
        if loader is None:
            return None
        # off the training RNG (a DataLoader draws a seed from it); workers forked with the signals blocked
        forked: list[Any] = []
        try:
            with torch.random.fork_rng(devices=[]), blocked_in_children(self.cfg.train.checkpoint_signals) as forked:
                return evaluate(self.engine, loader, device=self.engine.device, mean_std=self.mean_std,
                                dtype=self.dtype, clips_per_forward=self.cfg.eval.clips_per_forward,
                                max_batches=self.cfg.eval.max_batches, lockstep=self.zero_stage == 3,
                                average_clips=self.cfg.eval.average_clips, num_crops=self._data_value("num_crops", 1))
        finally:
            self._workers += forked

    def _resume(self) -> Position:
        """Load the checkpoint ``train.resume`` points to (after comparing its recipe with this run's)."""
        found = resolve_resume(self.cfg.train.resume, self.out_dir / "checkpoints")
        if found is None:
            return Position()
        root, tag = found
        manager = CheckpointManager(root, rank=self.dist.rank)
        meta = manager.read_meta(tag)
        rec = reconcile_recipe(self.cfg, meta, root / tag, self._facts(), self.dist.is_main)
        self.cfg, self._notes = rec.cfg, rec.notes
        state = manager.load(self.engine, tag, world_size=self.dist.world_size)
        if state.get("global_batch") != self.global_batch:
            raise ConfigError(f"checkpoint {root / tag} was written with global batch {state.get('global_batch')}, "
                              f"this run has {self.global_batch}: the data position would not match")
        saved_world = int(state.get("world_size") or self.dist.world_size)
        keys = load_epoch_keys(root / tag, saved_world, state["epoch"]) if state["micro_in_epoch"] else None
        pos = data_position(state, micro_batch=self.micro_batch, world_size=self.dist.world_size,
                            is_main=self.dist.is_main, epoch_keys=keys)
        if self.dist.is_main:
            logger.info("resumed from %s: step %d, epoch %d, micro-batch %d%s", root / tag, pos.step, pos.epoch,
                        pos.micro, f", {len(pos.exclude)} samples of the epoch already trained (excluded)"
                        if pos.exclude is not None else "")
            if pos.replay:
                logger.info("corrupt samples were skipped in this epoch before the checkpoint: re-reading its first "
                            "%d micro-batches (decoded, not trained on) so that the next batches are exact", pos.micro)
        return pos

    def _latest(self) -> str | None:
        tag = self.ckpt.latest()
        return str(self.ckpt.root / tag) if tag else None

    def _lock(self) -> RunLock | None:
        """Global rank 0 locks the output folder; every rank stops if it could not."""
        lock, error = None, None
        if self.dist.is_main:
            try:
                lock = RunLock(self.out_dir)
                lock.acquire()
            except RunLockedError as e:
                lock, error = None, e
        if all_reduce_max([int(error is not None)])[0]:
            raise error or RunLockedError(f"{self.out_dir} is in use by another run (global rank 0 could not lock it)")
        return lock

    # -- loop ---------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to the end (resuming first when a checkpoint exists); returns the run's summary.

        Raises :class:`Preempted` (status 75) after a checkpoint signal, :class:`PeerLostError`,
        :class:`NonFiniteLossError`, :class:`RunLockedError`.
        """
        lock, finished = self._lock(), False
        try:
            with SignalWatch(self.cfg.train.checkpoint_signals) as self._signals:
                result = self._fit()
            finished = True
            return result
        except (Preempted, PeerLostError, NonFiniteLossError):
            raise
        except Exception as e:
            if self.dist.world_size > 1 and self._phase != "data loading" and is_comm_failure(e):
                raise peer_lost(e, what=self._phase, step=self._at_step, timeout_s=self.cfg.train.dist_timeout_s,
                                rank=self.dist.rank, world=self.dist.world_size) from None
            raise
        finally:
            if not finished:  # loader workers that terminate() cannot stop would hold the exit forever
                stop_children(self._workers)
            if lock is not None:
                lock.release()

    def _fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        if self.engine is None:
            self.setup()
        rank0 = self.dist.is_main
        self._phase = "the resume"
        start = self._resume()
        cfg, step = self.cfg, start.step  # the recipe as the resume reconciled it
        self._last_saved = step
        if rank0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            clear_marker(self.out_dir)
            cfg.dump(self.out_dir / "config.yaml", notes=self._notes)
        self._metrics = MetricsLogger(self.out_dir, enabled=rank0, tensorboard=cfg.train.tensorboard,
                                      resume_step=step if start.resumed else None, wandb=cfg.train.wandb,
                                      config=cfg.to_dict())
        self._sample_log = SampleLog(self.out_dir, self.dist.rank, enabled=cfg.train.sample_log)
        # disable=None: a bar on a terminal only; a log file gets the epoch lines, not carriage-return updates
        self._bar = tqdm(total=self.total_steps, initial=step, disable=None if rank0 and cfg.train.progress else True,
                         desc="train", dynamic_ncols=True)
        result = TrainResult(step=step, epoch=start.epoch)
        self._guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, rank=self.dist.rank, latest=self._latest)
        self.engine.train()
        try:
            for epoch in range(start.epoch, cfg.train.epochs):
                if step >= self.total_steps:
                    break
                t0 = time.perf_counter()
                first = start if epoch == start.epoch else Position(step, epoch)
                step, loss_sum, steps, trained = self._train_epoch(epoch, step, first, result)
                result.step, result.epoch = step, epoch + 1
                summary = self._epoch_summary(epoch, loss_sum, steps, trained, time.perf_counter() - t0, step)
                if cfg.train.eval_every_epochs and (epoch + 1) % cfg.train.eval_every_epochs == 0:
                    self._phase = "evaluation"
                    ev = self._evaluate()
                    if ev is not None:
                        result.eval = ev
                        self._metrics.log(step, epoch, "val", loss=ev.loss, top1=ev.top1, top5=ev.top5)
                        summary += f" | val {ev.summary()}"
                if rank0:
                    tqdm.write(summary)
                if epoch + 1 < cfg.train.epochs and step < self.total_steps:
                    self._maybe_preempt(step, epoch, self.steps_per_epoch * self.grad_accum)
            if self._last_saved != step:
                self._save(step, max(result.epoch - 1, 0), self.steps_per_epoch * self.grad_accum)
            self._phase = "the export"
            result.export_dir = self.out_dir / "final"
            export_adapter(self.engine, result.export_dir)
            if rank0:
                cfg.dump(result.export_dir / "train_config.yaml", notes=self._notes)
        finally:
            self._bar.close()
            self._metrics.close()
        return result

    def _maybe_preempt(self, step: int, epoch: int, micro: int, loss_sum: float = 0.0, steps: int = 0) -> None:
        """At a step boundary: when a checkpoint signal was agreed on (or arrives now), save and exit 75."""
        self._phase = "the preemption check (all-reduce)"
        if not (self._stop or all_reduce_max([int(self._signals.requested)])[0]):
            return
        signame = self._signals.received or "a checkpoint signal (on another rank)"
        # a checkpoint of this very step is already complete: never rewrite it in place (a kill in the middle
        # would damage the checkpoint last_good points to)
        tag = self._save(step, epoch, micro, loss_sum, steps) if self._last_saved != step else self.ckpt.latest()
        checkpoint = str(self.ckpt.root / tag)
        if self.dist.is_main:
            write_marker(self.out_dir, step=step, signame=signame, checkpoint=checkpoint)
            logger.warning("preempted by %s: checkpoint %s at step %d; exiting with status 75", signame, checkpoint,
                           step)
        self._metrics.close()
        raise Preempted(step, signame, checkpoint)

    def _epoch_iterator(self, epoch: int, first: Position) -> Any:
        """The train loader's iterator for ``epoch``, positioned after ``first.micro`` micro-batches (or with
        the samples ``first.exclude`` left out, after a resume on another world size)."""
        loader = self.train_loader
        loader.set_epoch(epoch)
        self._corrupt_at_epoch_start = self._corrupt_count()
        self._keys.start(epoch, first.inherited)
        self._excluded_epoch = first.exclude is not None
        if first.exclude is not None:
            if hasattr(loader, "exclude_keys"):
                loader.exclude_keys(first.exclude)
            else:
                self._excluded_epoch = False
                if self.dist.is_main:
                    logger.warning("the train loader has no exclude_keys(): skipping %d micro-batches per rank "
                                   "instead; samples of the rest of this epoch may repeat or be missed", first.micro)
                loader.skip_batches(first.micro)
        elif first.micro and not first.replay:
            loader.skip_batches(first.micro)  # skipped samples are not decoded
        # torch's DataLoader draws its base seed from the global RNG when an iterator is made: keep that draw
        # (and any reading) off the training RNG, which a resume restores as it was after the previous step
        with torch.random.fork_rng(devices=[]), blocked_in_children(self.cfg.train.checkpoint_signals) as forked:
            it = iter(loader)  # forks the loader's workers, which must not die of a job-wide SIGTERM
            for _ in range(first.micro if first.replay else 0):
                next(it, None)  # decoded and dropped: corrupt samples shift the batches as they did before
        self._workers = [p for p in self._workers if p.is_alive()] + forked
        return it

    def _forward(self, batch: Any) -> tuple[torch.Tensor, list[str] | None]:
        video, label, *rest = batch
        keys = [str(k) for k in rest[0]] if rest and rest[0] is not None else None
        device = self.engine.device
        x = normalize_video(video.to(device, non_blocking=True), self.mean_std, dtype=self.dtype)
        self._phase = "the forward pass"
        logits = self.engine(x).float()
        return F.cross_entropy(logits, label.to(device), label_smoothing=self.cfg.train.label_smoothing), keys

    def _train_epoch(self, epoch: int, step: int, first: Position,
                     result: TrainResult) -> tuple[int, float, int, int]:
        """One epoch from micro-batch ``first.micro`` on; returns ``(step, summed step losses, steps, steps
        trained by this call)`` where the sums include the epoch's steps before a resume."""
        cfg = self.cfg
        per_epoch = self.steps_per_epoch * self.grad_accum
        it, micro = self._epoch_iterator(epoch, first), first.micro
        loss_sum, steps, trained = first.loss_sum, first.steps, 0
        step_loss, window, t0 = 0.0, [0.0, 0], time.perf_counter()
        while micro < per_epoch and step < self.total_steps:
            self._phase, self._at_step = "data loading", step + 1
            batch = next(it, None)
            self._phase = "the batch check (all-reduce)"
            ended, stop = all_reduce_max([int(batch is None), int(self._signals.requested)])
            self._stop = self._stop or bool(stop)
            if ended:  # all ranks stop together
                if self.dist.is_main:
                    logger.warning("epoch %d: the loader ran out after %d of %d micro-batches", epoch, micro, per_epoch)
                break
            loss, keys = self._forward(batch)
            lr = self._current_lr()
            loss_value = float(loss.detach())
            self._phase = "the loss check (all-reduce)"
            loss = self._guard.loss(loss, self.engine.module, step=step + 1, epoch=epoch)
            self._phase = "the backward pass (gradient reduction)"
            self.engine.backward(loss)
            self._phase = "the optimizer step"
            self.engine.step()
            micro += 1
            self._keys.add(keys)
            self._sample_log.add(keys)
            step_loss += (loss_value if math.isfinite(loss_value) else 0.0) / self.grad_accum
            if self.engine.global_steps == step:
                continue  # still accumulating
            step = self.engine.global_steps
            self._guard.grad_norm(self.engine, step=step, epoch=epoch)
            self._guard.step_done()
            self._sample_log.step(epoch, step)
            window = [window[0] + step_loss, window[1] + 1]
            loss_sum, steps, trained = loss_sum + step_loss, steps + 1, trained + 1
            seconds = time.perf_counter() - t0
            result.step_seconds.append(seconds)
            clips_s = self.global_batch / max(seconds, 1e-9)
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", clips_s=f"{clips_s:.1f}")
            if step % cfg.train.log_every == 0 or step == self.total_steps:
                self._phase = "the metrics all-reduce"
                total, count = all_reduce_sum(window)
                result.history.append((step, total / count))
                self._metrics.log(step, epoch, "train", loss=total / count, lr=lr, clips_per_s=clips_s)
                window = [0.0, 0]
            if cfg.train.save_every and step % cfg.train.save_every == 0:
                self._save(step, epoch, micro, loss_sum, steps)
            self.on_step_end(step, step_loss)
            if self._stop and micro < per_epoch and step < self.total_steps:
                self._maybe_preempt(step, epoch, micro, loss_sum, steps)
            step_loss, t0 = 0.0, time.perf_counter()
        return step, loss_sum, steps, trained

    def _epoch_summary(self, epoch: int, loss_sum: float, steps: int, trained: int, seconds: float, step: int) -> str:
        """The epoch's line: mean loss over all its steps (before a resume too), throughput of this process."""
        self._phase = "the epoch summary all-reduce"
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
