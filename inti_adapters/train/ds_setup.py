"""What the engine is built from: DeepSpeed's config from a recipe, and the recipe's data loaders."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import DataConfig, build_dataloader, ensure_builtin_dataset
from .config import Config, ConfigError, TrainLoopConfig
from .distributed import DistInfo, barrier

# (train, rank, world_size, epoch) -> loader with set_epoch() and skip_batches() (exclude_keys() for a resume on
# another world size); None = no such split. Train batches are (video, label) or (video, label, keys).
LoaderFactory = Callable[[bool, int, int, int], Any]
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
        # global rank 0 writes the shards first; then the first rank of each other node (which finds them on a
        # shared file system, or writes its own copy); then the node's other ranks: never two writers at once
        my_turn = 0 if dist_info.is_main else (1 if dist_info.local_rank == 0 else 2)
        for turn in (0, 1, 2):
            if turn == my_turn:
                dataset = ensure_builtin_dataset(root, **opts)
            barrier()
        data_cfg = dataset.to_data_config(**cfg.data)
        num_classes = int(dataset.num_classes)
    else:
        try:
            data_cfg = DataConfig(**cfg.data)
        except TypeError as e:
            raise ConfigError(f"data: {e}") from None

    classes = cfg.model.num_classes or num_classes  # labels outside [0, classes) are refused, naming the sample

    def factory(train: bool, rank: int, world_size: int, epoch: int) -> Any:
        if not train and not getattr(data_cfg, "val_shards", None):
            return None
        return build_dataloader(data_cfg, train=train, rank=rank, world_size=world_size, epoch=epoch,
                                with_keys=train, num_classes=classes)

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
