"""Training checkpoints (DeepSpeed engine + loop state + RNG) and the ZeRO-aware adapter export.

Layout under ``<output_dir>/checkpoints``::

    step_00000400/          DeepSpeed's files for that step (model, optimizer shards, scheduler,
                            client state) + rng_rank{r}.pt per rank + run.json (the recipe, what it
                            resolved to, notes on recipe changes at earlier resumes)
    last_good               name of the newest *complete* checkpoint

DeepSpeed's own ``latest`` file is not written. ``last_good`` is replaced atomically only
after every rank finished writing, so a crash in the middle of a save leaves the previous
checkpoint as the one a resume picks up.

Loading never unpickles arbitrary objects: every ``.pt`` file of the checkpoint is first checked
for pickled globals outside an allow-list (tensors, plain containers and the few DeepSpeed
objects its own files hold, :data:`DEEPSPEED_SAFE_GLOBALS`), then DeepSpeed reads its files
through ``torch.load(weights_only=True)`` under the same allow-list. Anything else (a tampered
file whose ``__reduce__`` would run a command) is refused with :class:`UnsafeCheckpointError`
naming the file and the offending global, before any of it is executed.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._io import atomic_write
from .._peft import peft_adapter_parameters
from .distributed import barrier
from .elastic import WorldSizeChangeError, has_consolidated, load_consolidated, needs_consolidated
from .failures import checkpoint_write_error

logger = logging.getLogger(__name__)

POINTER = "last_good"
META = "run.json"
_TAG = re.compile(r"^step_(\d{8,})$")
# the non-plain objects DeepSpeed 0.19 pickles into its checkpoint files (ZeRO 0-3, fp16/bf16), found by
# saving checkpoints and listing what torch.load(weights_only=True) refuses; (module, name) pairs
DEEPSPEED_SAFE_GLOBALS = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# -- RNG state, saved as tensors and plain values (readable with weights_only=True) --------------
def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states of this process."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": (py_version, torch.tensor(py_state, dtype=torch.int64), py_gauss),
        "numpy": (np_name, torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(int(v) for v in py_state.tolist()), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- loading without arbitrary unpickling ----------------------------------------------------------
class CheckpointError(RuntimeError):
    """A training checkpoint that cannot be read or trusted."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds pickled objects that a checkpoint written by ``inti-train`` never holds."""


def _safe_globals() -> list[Any]:
    out = []
    for module, name in DEEPSPEED_SAFE_GLOBALS:
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: fewer objects allowed
            continue
    return out


def _refuse(path: Path, offending: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refusing to load {path}: it holds pickled objects outside the allow-list ({offending}); a checkpoint "
        f"written by inti-train holds only tensors, plain values and DeepSpeed's own "
        f"{', '.join(n for _, n in DEEPSPEED_SAFE_GLOBALS)}. Loading it could run arbitrary code: the file may "
        f"have been replaced or tampered with. Resume from another checkpoint (train.resume=<checkpoints>/step_...) "
        f"or start over (train.resume=never)."
    )


def safe_torch_load(path: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` allowing DeepSpeed's own checkpoint objects, nothing else."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)|unrecognized function (.+?)(?: which|$)", str(e), re.MULTILINE)
        raise _refuse(Path(path), next(g for g in found.groups() if g) if found else str(e)[:200]) from None


def verify_checkpoint(directory: str | os.PathLike) -> None:
    """Refuse a checkpoint directory if any ``.pt`` file in it references a global outside the allow-list.

    Reads only the pickle of each file (not the tensor data); files in torch's legacy format are
    loaded with :func:`safe_torch_load` instead. Raises :class:`UnsafeCheckpointError`.
    """
    with torch.serialization.safe_globals(_safe_globals()):
        for path in sorted(Path(directory).rglob("*.pt")):
            try:
                bad = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except (ValueError, RuntimeError):  # not a zip checkpoint: a weights-only load checks it
                safe_torch_load(path, map_location="cpu")
                continue
            if bad:
                raise _refuse(path, ", ".join(sorted(bad)))


class _WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine with every ``load`` replaced by :func:`safe_torch_load`."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location)


class CheckpointManager:
    """Save / find / load training checkpoints of a DeepSpeed engine under ``root``."""

    def __init__(self, root: str | os.PathLike, *, rank: int, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.rank = rank
        self.keep_last = keep_last

    def latest(self) -> str | None:
        """Tag of the newest complete checkpoint, or None."""
        pointer = self.root / POINTER
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        return tag if (self.root / tag).is_dir() else None

    def save(self, engine: Any, step: int, client_state: dict[str, Any], *, meta: dict[str, Any] | None = None,
             before_commit: Callable[[Path], None] | None = None) -> str:
        """Collective: every rank calls it. ``meta`` (plain values) goes to ``run.json`` (rank 0);
        ``before_commit(directory)`` (every rank, may be collective) adds files before the checkpoint is
        marked complete. A write that fails (a full disk: "no space left on DEVICE while writing FILE")
        raises with the previous checkpoint still the latest. Returns the tag."""
        tag = tag_for(step)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
            if meta is not None and self.rank == 0:
                atomic_write(self.root / tag / META, json.dumps(meta, indent=1) + "\n")
            rng_path = self.root / tag / f"rng_rank{self.rank}.pt"
            atomic_write(rng_path, lambda p: torch.save(rng_state(), p))
            if before_commit is not None:
                before_commit(self.root / tag)
        except (OSError, RuntimeError) as e:
            failure = write_failure(e, self.root / tag)
            if failure is e:
                raise
            raise failure from e
        barrier()  # every rank's files are complete before the pointer moves
        if self.rank == 0:
            atomic_write(self.root / POINTER, tag + "\n")
            self._prune(keep=tag)
        barrier()
        return tag

    def _prune(self, keep: str) -> None:
        tags = sorted(p.name for p in self.root.iterdir() if p.is_dir() and _TAG.match(p.name))
        complete = [t for t in tags if t <= keep]
        for tag in complete[: -self.keep_last]:
            shutil.rmtree(self.root / tag, ignore_errors=True)

    def read_meta(self, tag: str) -> dict[str, Any] | None:
        """The ``run.json`` of a checkpoint, or None for a checkpoint written without one."""
        path = self.root / tag / META
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("recipe"), dict):
            raise CheckpointError(f"{path} does not hold a run record (a mapping with a 'recipe')")
        return meta

    def load(self, engine: Any, tag: str | None = None, *, world_size: int | None = None) -> dict[str, Any]:
        """Restore engine (model, optimizer, scheduler) and this rank's RNG; return the client state.

        With ``world_size`` other than the checkpoint's, and DeepSpeed files that depend on it (ZeRO >= 1,
        bf16), the world-size-independent consolidated state is loaded instead (:mod:`.elastic`).
        """
        tag = tag or self.latest()
        if tag is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.root} (no {POINTER} file)")
        meta = self.read_meta(tag) or {}
        saved_world = meta.get("facts", {}).get("world_size")
        if world_size is not None and saved_world not in (None, world_size) and needs_consolidated(engine):
            return self._load_consolidated(engine, tag, meta, saved_world, world_size)
        verify_checkpoint(self.root / tag)  # before DeepSpeed opens anything
        own = engine.checkpoint_engine
        engine.checkpoint_engine = _WeightsOnlyLoads(own)
        try:
            path, client_state = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                                        load_lr_scheduler_states=True)
        finally:
            engine.checkpoint_engine = own
        if path is None or client_state is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        self._load_rng(tag)
        return client_state

    def _load_rng(self, tag: str) -> None:
        rng_path = self.root / tag / f"rng_rank{self.rank}.pt"
        if rng_path.is_file():
            set_rng_state(safe_torch_load(rng_path))
        else:
            logger.warning("no RNG state for rank %d in %s (different world size?); RNG not restored",
                           self.rank, self.root / tag)

    def _load_consolidated(self, engine: Any, tag: str, meta: dict[str, Any], saved: int, now: int) -> dict[str, Any]:
        where = self.root / tag
        if not has_consolidated(where) or not isinstance(meta.get("state"), dict):
            raise WorldSizeChangeError(
                f"{where} was written by {saved} ranks and holds no world-size-independent state (written by an "
                f"older version, or under ZeRO-3); resume it with {saved} ranks, not {now}")
        load_consolidated(engine, where)
        self._load_rng(tag)
        if self.rank == 0:
            logger.info("%s was written by %d ranks: loaded its consolidated weights and optimizer state on %d",
                        where, saved, now)
        return dict(meta["state"])


_WRITER_FAILURES = ("unexpected pos", "basic_ios", "file write failed", "pytorchstreamwriter", "no space left")


def write_failure(exc: BaseException, directory: Path) -> BaseException:
    """The clear error for a checkpoint write that failed for lack of space, else ``exc`` itself.

    torch's zip writer reports a full disk as ``unexpected pos ... vs ...`` or ``basic_ios::clear``
    without a file name: when the disk holding the checkpoint has (almost) no space left, that is the cause.
    """
    text = str(exc).lower()
    full = getattr(exc, "errno", None) == errno.ENOSPC or "no space left" in text
    if not full and any(w in text for w in _WRITER_FAILURES):
        try:
            full = shutil.disk_usage(directory if directory.exists() else directory.parent).free < 16 * 2**20
        except OSError:
            full = False
    if not full:
        return exc
    files = [p for p in directory.rglob("*") if p.is_file()] if directory.is_dir() else []
    newest = max(files, key=lambda p: p.stat().st_mtime, default=directory)
    return checkpoint_write_error(OSError(errno.ENOSPC, "No space left on device", str(newest)), newest)


def resolve_resume(resume: str, checkpoints: Path) -> tuple[Path, str] | None:
    """``train.resume`` -> (checkpoints root, tag) to load, or None to start fresh."""
    if resume == "never":
        return None
    if resume == "auto":
        tag = CheckpointManager(checkpoints, rank=0).latest()
        return (checkpoints, tag) if tag else None
    path = Path(resume).expanduser()
    if (path / POINTER).is_file():
        tag = CheckpointManager(path, rank=0).latest()
        if tag is None:
            raise FileNotFoundError(f"train.resume={resume}: {POINTER} points to a missing checkpoint")
        return path, tag
    if path.is_dir() and _TAG.match(path.name):
        return path.parent, path.name
    raise FileNotFoundError(f"train.resume={resume!r}: expected 'auto', 'never', a checkpoints directory "
                            f"(with a {POINTER} file) or one of its step_* directories")


# -- export ---------------------------------------------------------------------------------------
def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """The full state dict of ``engine.module`` in float32 on rank 0 (None on other ranks).

    Collective. Under ZeRO-3 every partitioned parameter is gathered (one at a time, so the peak
    memory stays one tensor); under bf16 the trainable parameters come from the optimizer's
    fp32 master copies rather than the bf16 working weights.
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    mixed = engine.bfloat16_enabled() or engine.fp16_enabled()
    out: dict[str, torch.Tensor] = {}
    for key, t in engine.module.state_dict(keep_vars=True).items():
        full = None
        if isinstance(t, nn.Parameter) and mixed and t.requires_grad:
            full = safe_get_full_fp32_param(t)
        if full is None:
            gather = hasattr(t, "ds_id") and isinstance(t, nn.Parameter)
            with deepspeed.zero.GatheredParameters([t], modifier_rank=None) if gather else nullcontext():
                full = t.detach().clone() if rank0 else None
        if rank0:
            full = full.detach().cpu()
            out[key] = full.float() if full.is_floating_point() else full
    return out if rank0 else None


def export_adapter(engine: Any, directory: str | os.PathLike) -> None:
    """Collective: gather the weights and write ``save_pretrained`` files on rank 0.

    A peft part (LoRA) is written by peft from the live modules, so under ZeRO-3 its parameters
    are gathered around the save as well.
    """
    import deepspeed

    state = consolidated_state_dict(engine)
    peft = peft_adapter_parameters(engine.module) if engine.zero_optimization_partition_weights() else []
    with deepspeed.zero.GatheredParameters(peft, modifier_rank=None) if peft else nullcontext():
        if state is not None:
            engine.module.save_pretrained(str(directory), state_dict=state)
    barrier()
