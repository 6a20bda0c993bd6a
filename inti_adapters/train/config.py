"""Typed training configuration, read from YAML recipes with ``key=value`` overrides.

A recipe is a YAML mapping with the sections ``model``, ``data``, ``builtin_data``, ``optim``,
``train`` and ``eval`` (see the dataclasses below for every key, its type and its meaning)
plus an optional ``base`` (a path or list of paths, relative to the recipe) whose contents
are merged underneath it. Overrides use dotted keys and YAML values::

    cfg = load_config("recipes/k400_vitb16_inti.yaml", ["optim.lr=1e-5", "model.layers=[4, 6]"])

Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key, what
was received and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from ._recipe import ConfigError, coerce, parse_override, read_yaml, reject_unknown, set_dotted, type_name

ZERO_STAGES = (0, 1, 2, 3)
MODEL_SOURCES = ("timm", "open_clip")
RESUME_MODES = ("auto", "never")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class ModelConfig:
    """The backbone and what is injected into it."""

    name: str = field(
        default="vit_base_patch16_clip_224.openai",
        metadata=_help("timm model name (with optional pretrained tag) or an OpenCLIP model name."),
    )
    source: str = field(default="timm", metadata=_help("Where the name comes from: 'timm' or 'open_clip'."))
    pretrained: bool | str = field(
        default=False,
        metadata=_help("Load the name's pretrained weights (timm: true/false; OpenCLIP: a tag such as "
                       "'openai'). Needs network access or a warm cache."),
    )
    checkpoint: str | None = field(
        default=None,
        metadata=_help("Local weights file for the backbone (.safetensors, or a torch file read with "
                       "weights_only=True). Applied after creation; overrides 'pretrained'."),
    )
    num_classes: int | None = field(
        default=None, metadata=_help("Classifier outputs; null takes the built-in data set's class count.")
    )
    model_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help("Extra keyword arguments of timm.create_model / open_clip.create_model "
                       "(e.g. img_size, drop_path_rate)."),
    )
    layers: list[int] = field(
        default_factory=list, metadata=_help("Blocks after which a compressor runs; [] is the naive baseline.")
    )
    compressor: str = field(default="inti", metadata=_help("Registered compressor name."))
    compressor_config: dict[str, Any] = field(
        default_factory=dict, metadata=_help("Compressor options (InTIConfig fields for 'inti').")
    )
    temporal: str | list[dict[str, Any]] = field(
        default_factory=list,
        metadata=_help("Temporal adapters: a preset name of inti_adapters.temporal (e.g. 'uniformerv2_b') "
                       "or a list of specs passed to inject(temporal=...)."),
    )
    freeze_backbone: bool = field(
        default=False, metadata=_help("Train only the added modules (and the head if train_head).")
    )
    train_head: bool = field(default=True, metadata=_help("With freeze_backbone or LoRA, keep the head trainable."))
    lora: dict[str, Any] | None = field(
        default=None,
        metadata=_help("peft LoraConfig arguments (r, lora_alpha, lora_dropout, target_modules, ...); "
                       "LoRA layers are put into the backbone before inject. target_modules defaults "
                       "to the host's attention projections (inti_adapters.lora.lora_target_modules)."),
    )
    grad_checkpointing: bool = field(default=False, metadata=_help("Activation checkpointing of the blocks."))
    mean_std: str | list[list[float]] = field(
        default="auto",
        metadata=_help("Normalisation of uint8 clips on the device: 'auto' (the backbone's pretrained "
                       "config, else CLIP), 'clip', 'imagenet', 'inception' or [[mean x3], [std x3]]."),
    )

    def __post_init__(self) -> None:
        _choice("model.source", self.source, MODEL_SOURCES)
        if self.source == "timm" and isinstance(self.pretrained, str):
            raise ConfigError(f"model.pretrained must be true/false for timm (the tag goes in the name, e.g. "
                              f"'vit_base_patch16_clip_224.openai'), got {self.pretrained!r}")
        if self.source == "open_clip" and self.pretrained is True:
            raise ConfigError(f"model.pretrained for OpenCLIP is a tag such as 'openai' (see "
                              f"open_clip.list_pretrained_tags_by_model({self.name!r})), got true")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"model.num_classes must be a positive int or null, got {self.num_classes}")
        if sorted(set(self.layers)) != list(self.layers) or any(i < 0 for i in self.layers):
            raise ConfigError(f"model.layers must be distinct ascending block indices >= 0, got {self.layers}")
        if isinstance(self.mean_std, str):
            _choice("model.mean_std", self.mean_std, ("auto", "clip", "imagenet", "inception"))
        elif len(self.mean_std) != 2 or any(len(v) != 3 for v in self.mean_std):
            raise ConfigError(f"model.mean_std as a list must be [[m, m, m], [s, s, s]], got {self.mean_std}")
        if isinstance(self.temporal, str) and not self.temporal:
            raise ConfigError("model.temporal must be a preset name, a list of specs or [], got ''")
        if isinstance(self.temporal, list):
            for spec in self.temporal:
                if "name" not in spec:
                    raise ConfigError(f"each entry of model.temporal needs a 'name', got {spec!r}")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay, optional layer-wise learning-rate decay."""

    lr: float = field(default=1e-4, metadata=_help("Peak learning rate (after warm-up), top layer."))
    min_lr_ratio: float = field(default=0.01, metadata=_help("Cosine ends at lr * min_lr_ratio."))
    weight_decay: float = field(default=0.05, metadata=_help("AdamW decoupled weight decay (not on norms, "
                                                             "biases, tokens and position tables)."))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata=_help("AdamW betas."))
    eps: float = field(default=1e-8, metadata=_help("AdamW epsilon."))
    warmup_epochs: float = field(default=0.0, metadata=_help("Linear warm-up length in epochs."))
    warmup_steps: int | None = field(default=None, metadata=_help("Warm-up in optimizer steps; overrides "
                                                                  "warmup_epochs when set."))
    layer_decay: float | None = field(
        default=None,
        metadata=_help("Layer-wise lr decay: block i of L gets lr * decay**(L - i); embeddings decay**(L+1). "
                       "null or 1.0 = off."),
    )

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_epochs < 0 or (self.warmup_steps is not None and self.warmup_steps < 0):
            raise ConfigError(f"warm-up must be >= 0, got warmup_epochs={self.warmup_epochs}, "
                              f"warmup_steps={self.warmup_steps}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"optim.layer_decay must be in (0, 1] or null, got {self.layer_decay}")


@dataclass
class TrainLoopConfig:
    """The DeepSpeed training loop."""

    output_dir: str = field(default="runs/default", metadata=_help("Checkpoints, metrics and the export."))
    epochs: int = field(default=30, metadata=_help("Training epochs."))
    steps_per_epoch: int | None = field(
        default=None,
        metadata=_help("Optimizer steps per epoch; null = the train loader's batches per epoch // grad_accum "
                       "(data.train_samples // (batch_size x world size) for a loader without a length)."),
    )
    grad_accum: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    global_batch_size: int | None = field(
        default=None,
        metadata=_help("Clips per optimizer step over all ranks; when set, grad_accum is derived from it "
                       "(global / (data.batch_size * world_size)) so a recipe keeps its batch on any GPU count."),
    )
    clip_grad: float | None = field(default=1.0, metadata=_help("Gradient-norm clipping; null = off."))
    zero_stage: int | None = field(default=None, metadata=_help("ZeRO stage 0-3; null = the DeepSpeed JSON's "
                                                                "(0 without one)."))
    bf16: bool = field(default=False, metadata=_help("bf16 mixed precision (GPU recipes; off on CPU)."))
    deepspeed_config: str | None = field(
        default=None,
        metadata=_help("DeepSpeed JSON (relative to the recipe) for ZeRO tuning; batch sizes and clipping "
                       "always come from the recipe, stage and bf16 from the keys of this section."),
    )
    label_smoothing: float = field(default=0.0, metadata=_help("Cross-entropy label smoothing."))
    seed: int = field(default=0, metadata=_help("Seed for model init (same on all ranks) and RNG (per rank)."))
    save_every: int = field(default=1000, metadata=_help("Checkpoint every N optimizer steps; 0 = only at end."))
    keep_last: int = field(default=2, metadata=_help("Checkpoints kept on disk (older ones are deleted)."))
    log_every: int = field(default=10, metadata=_help("Metrics row (CSV/TensorBoard) every N steps."))
    eval_every_epochs: int = field(default=1, metadata=_help("Multi-view evaluation every N epochs; 0 = never."))
    resume: str = field(
        default="auto",
        metadata=_help("'auto' resumes from output_dir's last complete checkpoint, 'never' starts over, "
                       "or a checkpoint directory."),
    )
    backend: str | None = field(default=None, metadata=_help("torch.distributed backend; null = nccl with "
                                                             "CUDA, gloo without."))
    progress: bool = field(default=True, metadata=_help("tqdm progress bar on rank 0."))
    tensorboard: bool = field(default=True, metadata=_help("Also log to TensorBoard when it is installed."))

    def __post_init__(self) -> None:
        for name in ("epochs", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps_per_epoch", "global_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1 or null, got {getattr(self, name)}")
        for name in ("save_every", "eval_every_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_last < 1:
            raise ConfigError(f"train.keep_last must be >= 1, got {self.keep_last}")
        if self.zero_stage is not None:
            _choice("train.zero_stage", self.zero_stage, ZERO_STAGES)
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"train.clip_grad must be > 0 or null, got {self.clip_grad}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.backend is not None:
            _choice("train.backend", self.backend, ("nccl", "gloo", "mpi", "ccl", "hccl"))


@dataclass
class EvalConfig:
    """Multi-view evaluation (``inti-eval`` and the evaluation during training)."""

    checkpoint: str | None = field(
        default=None,
        metadata=_help("Directory written by save_pretrained; null = <train.output_dir>/final."),
    )
    clips_per_forward: int | None = field(
        default=None, metadata=_help("Views per forward pass (memory bound); null = a whole batch of views.")
    )
    flops: bool = field(default=True, metadata=_help("Print GFLOPs per view (count_gflops on one view)."))
    max_batches: int | None = field(default=None, metadata=_help("Stop after N batches (quick checks)."))

    def __post_init__(self) -> None:
        for name in ("clips_per_forward", "max_batches"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"eval.{name} must be >= 1 or null, got {getattr(self, name)}")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": TrainLoopConfig,
    "eval": EvalConfig,
}
FREE_SECTIONS = ("data", "builtin_data")  # mappings checked by the data package (DataConfig)
PATH_KEYS = {("train", "deepspeed_config"), ("model", "checkpoint")}


@dataclass
class Config:
    """A whole recipe. ``data`` holds :class:`inti_adapters.data.DataConfig` fields;
    ``builtin_data`` (optional) holds ``ensure_builtin_dataset(root, **options)`` arguments."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: dict[str, Any] = field(default_factory=dict)
    builtin_data: dict[str, Any] | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.builtin_data is not None and "root" not in self.builtin_data:
            raise ConfigError(f"builtin_data needs a 'root' directory, got {self.builtin_data!r}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """Build and validate a config from a plain mapping (as read from YAML)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a recipe must be a mapping of sections, got {type(raw).__name__}")
        known = list(SECTIONS) + list(FREE_SECTIONS)
        reject_unknown("", raw, known)
        kwargs: dict[str, Any] = {}
        for name, section_cls in SECTIONS.items():
            section = raw.get(name) or {}
            if not isinstance(section, dict):
                raise ConfigError(f"section '{name}' must be a mapping, got {section!r}")
            kwargs[name] = _build_section(name, section_cls, section)
        for name in FREE_SECTIONS:
            value = raw.get(name)
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"section '{name}' must be a mapping, got {value!r}")
            kwargs[name] = dict(value) if value is not None else ({} if name == "data" else None)
        _check_data_sections(kwargs["data"], kwargs["builtin_data"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dump(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (loadable again with :func:`load_config`)."""
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


# -- loading ------------------------------------------------------------------------------------
def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a recipe (and its ``base`` files), apply ``key=value`` overrides and validate.

    Args:
        path: The YAML recipe, or None to start from the defaults.
        overrides: Dotted ``section.key=value`` strings; values are parsed as YAML
            (``model.layers=[4, 6]``, ``train.bf16=true``, ``model.checkpoint=null``).
    """
    raw = read_yaml(Path(path), PATH_KEYS) if path is not None else {}
    for item in overrides:
        key, value = parse_override(item, PATH_KEYS)
        set_dotted(raw, key, value)
    return Config.from_dict(raw)


# -- validation ---------------------------------------------------------------------------------
def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    reject_unknown(name, values, names)
    kwargs = {k: coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # from nested validators
        raise ConfigError(f"section '{name}': {e}") from None


def _check_data_sections(data: dict[str, Any], builtin: dict[str, Any] | None) -> None:
    """Unknown keys of ``data`` / ``builtin_data``, checked against the data package's configs."""
    try:
        from ..data import DataConfig, DigitsOptions
    except ImportError:  # the training extras (webdataset, av) are missing: the loader will say so
        return
    reject_unknown("data", data, [f.name for f in dataclasses.fields(DataConfig)])
    if builtin is not None:
        reject_unknown("builtin_data", builtin, ["root", "workers", *(f.name for f in dataclasses.fields(DigitsOptions))])


def help_text() -> str:
    """Every key of every section with its type, default and help (``inti-train --help-config``)."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:")
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  {f.name} ({type_name(hints[f.name])}, default {default!r}): {f.metadata.get('help', '')}")
    lines.append("data: fields of inti_adapters.data.DataConfig (train_shards, val_shards, num_frames, ...)")
    lines.append("builtin_data: {root: DIR, ...options of inti_adapters.data.ensure_builtin_dataset}")
    return "\n".join(lines)
