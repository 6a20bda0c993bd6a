"""Training state that does not depend on the number of ranks, for resuming on another world size.

DeepSpeed's ZeRO-1/2 checkpoint files hold each rank's slice of the fp32 master weights and
optimizer moments, and DeepSpeed refuses to load them at another data-parallel size ("used a DP
world size of 2 but the current world size is 1"). Its universal checkpoint conversion unpickles
freely, which resume refuses. So each checkpoint of a run whose DeepSpeed files depend on the world
size also holds a consolidated state, written by global rank 0:

    consolidated.safetensors   param/NAME, exp_avg/NAME, exp_avg_sq/NAME (fp32, full shapes) of every
                               trainable parameter
    consolidated.json          Adam's step count, the scheduler's state, DeepSpeed's step counters,
                               the parameter names and shapes, the world size it was written at

gathered with ``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``
(collectives: every rank calls :func:`save_consolidated`), and loaded at another world size into the
freshly initialised engine with ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``.
Frozen parameters are not stored: the recipe (compared on resume) rebuilds them identically.
ZeRO stages 0-2 (with or without bf16); ZeRO-3 is refused with a message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write

TENSORS = "consolidated.safetensors"
RECORD = "consolidated.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
_FLAT_PARTITIONS = ("single_partition_of_fp32_groups", "fp32_groups_flat_partition")  # ZeRO-1/2, bf16 optimizer


class WorldSizeChangeError(RuntimeError):
    """A checkpoint cannot be loaded at this world size."""


def needs_consolidated(engine: Any) -> bool:
    """Whether DeepSpeed's own files of this engine depend on the world size (ZeRO >= 1 or bf16)."""
    return engine.zero_optimization_stage() >= 1 or engine.bfloat16_enabled()


def _trainable(engine: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _torch_optimizer(engine: Any) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt) if not isinstance(opt, torch.optim.Optimizer) else opt


def _adam_step(engine: Any) -> int:
    for state in _torch_optimizer(engine).state.values():
        if "step" in state:
            return int(float(state["step"]))
    return 0


def _full(param: torch.nn.Parameter, key: str | None, engine: Any) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    if value is None:  # no ZeRO partitioning: the parameter and the torch optimizer's state hold it whole
        value = param.detach() if key is None else _torch_optimizer(engine).state[param][key]
    return value.detach().float().cpu().contiguous()


def save_consolidated(engine: Any, directory: Path, *, rank: int, world_size: int) -> None:
    """Collective: gather full fp32 weights and Adam moments; rank 0 writes them into ``directory``."""
    from safetensors.torch import save_file

    if engine.zero_optimization_stage() == 3:
        return  # not supported yet (see the module docstring); a resume at another size is refused
    _relink(engine)
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, param in _trainable(engine):
        for key in (None, *MOMENTS):
            value = _full(param, key, engine)
            if rank == 0:
                tensors[f"{key or 'param'}/{name}"] = value
        shapes[name] = list(param.shape) if not hasattr(param, "ds_shape") else list(param.ds_shape)
    if rank != 0:
        return
    record = {"world_size": world_size, "adam_step": _adam_step(engine), "global_steps": int(engine.global_steps),
              "global_samples": int(engine.global_samples), "skipped_steps": int(engine.skipped_steps),
              "scheduler": _plain(engine.lr_scheduler.state_dict()) if engine.lr_scheduler is not None else None,
              "shapes": shapes}
    atomic_write(directory / TENSORS, lambda p: save_file(tensors, p))
    atomic_write(directory / RECORD, json.dumps(record) + "\n")


def _relink(engine: Any) -> None:
    """Point DeepSpeed's per-parameter fragments at the optimizer state again: its checkpoint save re-creates the
    parameters' mappings without their optimizer-state views (which it links only after an optimizer step)."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and _torch_optimizer(engine).state:
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _plain(value: Any) -> Any:
    """A scheduler state dict as JSON values (LambdaLR's lambdas are WarmupCosine objects' __dict__)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def has_consolidated(directory: Path) -> bool:
    return (directory / TENSORS).is_file() and (directory / RECORD).is_file()


def load_consolidated(engine: Any, directory: Path) -> dict[str, Any]:
    """Load the consolidated state into ``engine`` (any world size); returns the record."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors.torch import load_file

    if engine.zero_optimization_stage() == 3:
        raise WorldSizeChangeError(f"resuming {directory} at another world size is not supported under ZeRO-3; "
                                   "resume with the checkpoint's number of ranks")
    try:
        record = json.loads((directory / RECORD).read_text())
        tensors = load_file(str(directory / TENSORS))
    except (OSError, ValueError) as e:
        raise WorldSizeChangeError(f"cannot read the consolidated state in {directory}: {e}") from None
    params = _trainable(engine)
    names = {n for n, _ in params}
    saved = set(record.get("shapes", {}))
    if names != saved:
        missing, extra = sorted(names - saved)[:5], sorted(saved - names)[:5]
        raise WorldSizeChangeError(f"{directory / RECORD} holds other trainable parameters than this model "
                                   f"(missing {missing}, unexpected {extra}): another model")
    _init_optimizer_state(engine, record["adam_step"])
    for name, param in params:
        value = tensors[f"param/{name}"]
        if list(value.shape) != list(param.shape):
            raise WorldSizeChangeError(f"{directory / TENSORS}: {name} has shape {list(value.shape)}, the model's "
                                       f"is {list(param.shape)}: another model")
        value = value.to(param.device)
        safe_set_full_fp32_param(param, value)
        with torch.no_grad():
            param.data.copy_(value.to(param.dtype))  # the working (lp) copy every rank holds whole
        for key in MOMENTS:
            moment = tensors[f"{key}/{name}"].to(param.device)
            if hasattr(param, "_hp_mapping"):  # ZeRO-managed (None: no slice of it on this rank)
                safe_set_full_optimizer_state(param, moment, key)
            else:
                _torch_optimizer(engine).state[param][key].copy_(moment)
    if engine.lr_scheduler is not None and record.get("scheduler") is not None:
        engine.lr_scheduler.load_state_dict(record["scheduler"])
        for group, lr in zip(_torch_optimizer(engine).param_groups, record["scheduler"].get("_last_lr", []), strict=False):
            group["lr"] = lr  # what the checkpoint's last scheduler step set
    engine.global_steps = record["global_steps"]
    engine.global_samples = record["global_samples"]
    engine.skipped_steps = record["skipped_steps"]
    return record


def _init_optimizer_state(engine: Any, step: int) -> None:
    """Create Adam's state (zeros, ``step``) before the first optimizer step, and link DeepSpeed's fragments."""
    inner = _torch_optimizer(engine)
    flat = next((getattr(engine.optimizer, a) for a in _FLAT_PARTITIONS if hasattr(engine.optimizer, a)), None)
    targets = list(flat) if flat is not None else [p for g in inner.param_groups for p in g["params"]]
    for p in targets:
        inner.state[p] = {"step": torch.tensor(float(step)), **{k: torch.zeros_like(p) for k in MOMENTS}}
    if flat is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
