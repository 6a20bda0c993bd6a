"""Typed training configuration, read from YAML recipes with ``key=value`` overrides.

A recipe is a YAML mapping with the sections ``model``, ``data``, ``builtin_data``, ``optim``,
``train`` and ``eval`` (see the dataclasses below for every key, its type and its meaning)
plus an optional ``base`` (a path or list of paths, relative to the recipe) whose contents
are merged underneath it. Overrides use dotted keys and YAML values::

    cfg = load_config("k400_vitb16_inti", ["optim.lr=1e-5", "model.layers=[4, 6]"])  # or a path to a YAML file

Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key, what
was received and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import yaml

from .._config import Config as ConfigBase
from .._config import check_choice, option
from .._io import atomic_write
from ..config import InjectConfig
from ..data import DataConfig, DigitsOptions
from ..recipes import find_recipe
from ..temporal import PRESETS
from ._recipe import ConfigError, coerce, parse_override, read_yaml, reject_unknown, set_dotted, type_name

ZERO_STAGES = (0, 1, 2, 3)
MODEL_SOURCES = ("timm", "open_clip")
RESUME_MODES = ("auto", "never")
# signals a checkpoint-and-exit may be bound to (those a scheduler sends; SIGINT stays Ctrl-C)
CHECKPOINT_SIGNALS = tuple(n for n in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGCONT", "SIGINT")
                           if hasattr(signal, n))


@dataclass
class ModelConfig(InjectConfig):
    """The backbone, and what is injected into it: every option of ``inject``
    (:class:`inti_adapters.InjectConfig`: ``layers``, ``compressor``, ``compressor_config``,
    ``temporal``, ``freeze_backbone``, ``train_head``, ``input_layout``, ``host``) plus the
    fields below."""

    name: str = option(
        "vit_base_patch16_clip_224.openai",
        help="timm model name (with optional pretrained tag) or an OpenCLIP model name.",
    )
    source: str = option("timm", help="Where the name comes from: 'timm' or 'open_clip'.")
    pretrained: bool | str = option(
        False,
        help="Load the name's pretrained weights (timm: true/false; OpenCLIP: a tag such as 'openai'). Needs "
             "network access or a warm cache.",
    )
    checkpoint: str | None = option(
        None,
        help="Local weights file for the backbone (.safetensors, or a torch file read with weights_only=True). "
             "Applied after creation; overrides 'pretrained'.",
    )
    num_classes: int | None = option(None, help="Classifier outputs; null takes the built-in data set's class count.")
    model_kwargs: dict[str, Any] = option(
        default_factory=dict,
        help="Extra keyword arguments of timm.create_model / open_clip.create_model (e.g. img_size, drop_path_rate).",
    )
    lora: dict[str, Any] | None = option(
        None,
        help="peft LoraConfig arguments (r, lora_alpha, lora_dropout, target_modules, ...); LoRA layers are put "
             "into the backbone before inject. target_modules defaults to the host's attention projections "
             "(inti_adapters.lora.lora_target_modules).",
    )
    grad_checkpointing: bool = option(False, help="Activation checkpointing of the blocks.")
    mean_std: str | list[list[float]] = option(
        "auto",
        help="Normalisation of uint8 clips on the device: 'auto' (the backbone's own, from its host, else CLIP), "
             "'clip', 'imagenet', 'inception' or [[mean x3], [std x3]].",
    )

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from None
        check_choice("model.source", self.source, MODEL_SOURCES)
        if self.source == "timm" and isinstance(self.pretrained, str):
            raise ConfigError(f"model.pretrained must be true/false for timm (the tag goes in the name, e.g. "
                              f"'vit_base_patch16_clip_224.openai'), got {self.pretrained!r}")
        if self.source == "open_clip" and self.pretrained is True:
            raise ConfigError(f"model.pretrained for OpenCLIP is a tag such as 'openai' (see "
                              f"open_clip.list_pretrained_tags_by_model({self.name!r})), got true")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"model.num_classes must be a positive int or null, got {self.num_classes}")
        if isinstance(self.mean_std, str):
            check_choice("model.mean_std", self.mean_std, ("auto", "clip", "imagenet", "inception"))
        elif len(self.mean_std) != 2 or any(len(v) != 3 for v in self.mean_std):
            raise ConfigError(f"model.mean_std as a list must be [[m, m, m], [s, s, s]], got {self.mean_std}")
        elif not all(s > 0 for s in self.mean_std[1]):
            raise ConfigError(f"model.mean_std: every std must be > 0 (a clip is divided by it), got {self.mean_std[1]}")
        if isinstance(self.temporal, str) and self.temporal not in PRESETS:
            raise ConfigError(f"model.temporal: unknown preset {self.temporal!r}; presets: {sorted(PRESETS)} (or "
                              "give a list of adapter specs)")


@dataclass
class OptimConfig(ConfigBase):
    """AdamW with linear warm-up and cosine decay, optional layer-wise learning-rate decay."""

    lr: float = option(1e-4, help="Peak learning rate (after warm-up), top layer.")
    min_lr_ratio: float = option(0.01, help="Cosine ends at lr * min_lr_ratio.")
    weight_decay: float = option(0.05, help="AdamW decoupled weight decay (not on norms, "
                                                             "biases, tokens and position tables).")
    betas: list[float] = option(default_factory=lambda: [0.9, 0.999], help="AdamW betas.")
    eps: float = option(1e-8, help="AdamW epsilon.")
    warmup_epochs: float = option(0.0, help="Linear warm-up length in epochs.")
    warmup_steps: int | None = option(None, help="Warm-up in optimizer steps; overrides "
                                                                  "warmup_epochs when set.")
    layer_decay: float | None = option(
        None,
        help="Layer-wise lr decay: block i of L gets lr * decay**(L - i); embeddings decay**(L+1). "
                       "null or 1.0 = off.",
    )
    added_lr_scale: float = option(
        1.0,
        help="Learning-rate multiplier for the added modules (InTI layers / compressors, temporal adapters), "
             "which start from scratch while the backbone starts pretrained; 1.0 = the same lr.",
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
        if not self.added_lr_scale > 0:
            raise ConfigError(f"optim.added_lr_scale must be > 0, got {self.added_lr_scale}")


@dataclass
class TrainLoopConfig(ConfigBase):
    """The DeepSpeed training loop."""

    output_dir: str = option("runs/default", help="Checkpoints, metrics and the export.")
    epochs: int = option(30, help="Training epochs.")
    steps_per_epoch: int | None = option(
        None,
        help="Optimizer steps per epoch; null = the train loader's batches per epoch // grad_accum "
                       "(data.train_samples // (batch_size x world size) for a loader without a length).",
    )
    grad_accum: int = option(1, help="Micro-batches per optimizer step.")
    global_batch_size: int | None = option(
        None,
        help="Clips per optimizer step over all ranks; when set, grad_accum is derived from it "
                       "(global / (data.batch_size * world_size)) so a recipe keeps its batch on any GPU count.",
    )
    clip_grad: float | None = option(1.0, help="Gradient-norm clipping; null = off.")
    zero_stage: int | None = option(None, help="ZeRO stage 0-3; null = the DeepSpeed JSON's "
                                                                "(0 without one).")
    bf16: bool = option(False, help="bf16 mixed precision (GPU recipes; off on CPU).")
    deepspeed_config: str | None = option(
        None,
        help="DeepSpeed JSON (relative to the recipe) for ZeRO tuning; batch sizes and clipping "
                       "always come from the recipe, stage and bf16 from the keys of this section.",
    )
    label_smoothing: float = option(0.0, help="Cross-entropy label smoothing.")
    seed: int = option(0, help="Seed for model init (same on all ranks) and RNG (per rank).")
    save_every: int = option(1000, help="Checkpoint every N optimizer steps; 0 = only at end.")
    keep_last: int = option(2, help="Checkpoints kept on disk (older ones are deleted).")
    log_every: int = option(10, help="Metrics row (CSV/TensorBoard) every N steps.")
    eval_every_epochs: int = option(1, help="Multi-view evaluation every N epochs; 0 = never.")
    resume: str = option(
        "auto",
        help="'auto' resumes from output_dir's last complete checkpoint, 'never' starts over, "
                       "or a checkpoint directory.",
    )
    backend: str | None = option(None, help="torch.distributed backend; null = nccl with "
                                                             "CUDA, gloo without.")
    progress: bool = option(True, help="tqdm progress bar on rank 0 when stderr is a terminal (a log file gets "
                                           "the epoch lines only).")
    tensorboard: bool = option(True, help="Also log to TensorBoard when it is installed.")
    wandb: dict[str, Any] | None = option(
        None,
        help="Weights & Biases on global rank 0: keyword arguments of wandb.init (project, entity, name, "
             "mode, ...); null = off. WANDB_MODE=offline writes the run folder locally.",
    )
    dist_timeout_s: float = option(
        1800.0,
        help="Seconds a collective (or the rendezvous) waits for the other ranks; a lost peer then ends the "
             "run with PeerLostError and a non-zero exit instead of a hang.",
    )
    sample_log: bool = option(
        False,
        help="Write OUTPUT_DIR/samples/rank{R}.jsonl: one line per optimizer step with the sample keys each "
             "rank trained on (appended on resume).",
    )
    checkpoint_signals: list[str] = option(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"],
        help="Signals that make every rank finish its optimizer step, write a checkpoint, write "
             "OUTPUT_DIR/PREEMPTED and exit with status 75 (resumable); [] = the default actions.",
    )
    max_nonfinite_steps: int = option(
        0,
        help="Optimizer steps with a non-finite loss that may be skipped (their bad micro-batches give no "
             "gradient) before the run stops with NonFiniteLossError; 0 = stop at the first.",
    )

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
            check_choice("train.zero_stage", self.zero_stage, ZERO_STAGES)
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"train.clip_grad must be > 0 or null, got {self.clip_grad}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.backend is not None:
            check_choice("train.backend", self.backend, ("nccl", "gloo", "mpi", "ccl", "hccl"))
        if not self.dist_timeout_s > 0 or self.dist_timeout_s == float("inf"):
            raise ConfigError(f"train.dist_timeout_s must be a finite number of seconds > 0, got {self.dist_timeout_s}")
        if self.max_nonfinite_steps < 0:
            raise ConfigError(f"train.max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")
        for name in self.checkpoint_signals:
            if name not in CHECKPOINT_SIGNALS:
                raise ConfigError(f"train.checkpoint_signals: {name!r} is not a signal a run can catch here; "
                                  f"expected names among {list(CHECKPOINT_SIGNALS)}")


@dataclass
class EvalConfig(ConfigBase):
    """Multi-view evaluation (``inti-eval`` and the evaluation during training)."""

    checkpoint: str | None = option(
        None,
        help="Directory written by save_pretrained; null = <train.output_dir>/final.",
    )
    clips_per_forward: int | None = option(
        None, help="Views per forward pass (memory bound); null = a whole batch of views."
    )
    flops: bool = option(True, help="Print GFLOPs per view (count_gflops on one view).")
    max_batches: int | None = option(None, help="Stop after N batches (quick checks).")
    average_clips: str = option("prob", help="How the views of a video are averaged, as in mmaction2: 'prob' "
                                             "(softmax of each view, mmaction2's recognisers) or 'score' (raw scores).")

    def __post_init__(self) -> None:
        check_choice("eval.average_clips", self.average_clips, ("prob", "score"))
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
class Config(ConfigBase):
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
    def from_dict(cls, raw: dict[str, Any], *, strict: bool = True) -> Config:  # type: ignore[override]
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

    def dump(self, path: str | os.PathLike, *, notes: list[str] | tuple[str, ...] = ()) -> None:
        """Write the resolved config as YAML (loadable again with :func:`load_config`), atomically;
        ``notes`` go above it as ``#`` comment lines (e.g. what a resume changed)."""
        header = "".join(f"# {line}\n" for note in notes for line in str(note).splitlines())
        atomic_write(path, header + yaml.safe_dump(self.to_dict(), sort_keys=False))


# -- loading ------------------------------------------------------------------------------------
def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a recipe (and its ``base`` files), apply ``key=value`` overrides and validate.

    Args:
        path: The YAML recipe (a file, or the name of a built-in recipe such as ``"k400_vitb16_inti"``:
            :func:`inti_adapters.recipes.list_recipes`), or None to start from the defaults.
        overrides: Dotted ``section.key=value`` strings; values are parsed as YAML
            (``model.layers=[4, 6]``, ``train.bf16=true``, ``model.checkpoint=null``).
    """
    try:
        raw = read_yaml(find_recipe(path), PATH_KEYS) if path is not None else {}
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    for item in overrides:
        key, value = parse_override(item, PATH_KEYS)
        set_dotted(raw, key, value)
    return Config.from_dict(raw)


# -- validation ---------------------------------------------------------------------------------
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


def _check_data_sections(data: dict[str, Any], builtin: dict[str, Any] | None) -> DataConfig:
    """``data`` / ``builtin_data`` checked by the data package's configs (keys and values), so that a bad
    value is reported when the recipe is read, not after DeepSpeed started."""
    reject_unknown("data", data, [f.name for f in dataclasses.fields(DataConfig)])
    base: dict[str, Any] = {}
    if builtin is not None:
        reject_unknown("builtin_data", builtin, ["root", "workers", *(f.name for f in dataclasses.fields(DigitsOptions))])
        try:
            options = DigitsOptions(**{k: v for k, v in builtin.items() if k not in ("root", "workers")})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"builtin_data: {e}") from None
        # what DigitsDataset.to_data_config puts under the data section's values
        base = {"num_frames": options.num_frames, "crop_size": options.image_size, "short_side": options.image_size}
    try:
        return DataConfig(**{**base, **data})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data: {e}") from None


def _key_lines(cls: type) -> list[str]:
    """One line per field of a config dataclass: name (type, default): help."""
    hints = get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {f.name} ({type_name(hints[f.name])}, default {default!r}): {f.metadata.get('help', '')}")
    return lines


def help_text() -> str:
    """Every key of every section with its type, default and help (``inti-train --help-config``);
    the ``data`` and ``builtin_data`` keys come from the data package's dataclasses themselves."""
    lines = []
    for name, cls in SECTIONS.items():
        lines += [f"{name}:", *_key_lines(cls)]
    lines += ["data: (inti_adapters.data.DataConfig; with builtin_data, num_frames, crop_size and short_side "
              "default to the built-in data set's)", *_key_lines(DataConfig)]
    lines += ["builtin_data: (optional: the built-in data set, created under root if missing)",
              "  root (str, required): Folder of the built-in data set (created if missing).",
              "  workers (int, default None): Processes that encode its shards in parallel (None: up to 2; the data do not depend on it).",
              *_key_lines(DigitsOptions)]
    return "\n".join(lines)


def data_with_defaults(cfg: Config) -> dict[str, Any]:
    """The ``data`` section as the reader sees it: the recipe's values over every ``DataConfig``
    default (and over the built-in data set's frame count and size), for ``--print-config``."""
    return _check_data_sections(dict(cfg.data), cfg.builtin_data).to_dict()


# -- resuming with another recipe ---------------------------------------------------------------
# What a resume does with a ``section.key`` whose value differs from the checkpoint's recipe; the first
# matching entry wins ("model." matches every model key).
NOT_COMPARED = ("model.grad_checkpointing", "model.num_classes", "train.output_dir", "train.resume", "train.save_every", "train.keep_last",
                "train.log_every", "train.eval_every_epochs", "train.backend", "train.progress", "train.tensorboard",
                "train.wandb", "train.dist_timeout_s", "train.sample_log", "train.checkpoint_signals",
                "train.max_nonfinite_steps",
                "eval.")  # how the run is operated, not what it computes (the class count is compared resolved)
KEPT_FROM_CHECKPOINT = ("optim.", "train.seed", "model.pretrained", "model.checkpoint")  # restored state wins
# the weights / optimizer state would not fit; the data position (and the keys trained) belong to the data set
REFUSED_ON_RESUME = ("model.", "train.zero_stage", "train.bf16", "data.train_shards", "builtin_data.")


def _flat(recipe: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for section, values in recipe.items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            out[section] = values
    return out


@dataclass
class RecipeChanges:
    """How a resumed run's recipe differs from its checkpoint's (see :func:`compare_recipes`)."""

    refused: list[str] = field(default_factory=list)  # "key: saved -> now" lines
    kept: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    effective: dict[str, Any] = field(default_factory=dict)  # the recipe the resumed run really follows


def compare_recipes(saved: dict[str, Any], current: Config) -> RecipeChanges:
    """Compare a checkpoint's recipe with the one a run resumes with, key by key.

    - ``model.*`` (but ``pretrained``, ``checkpoint``, ``grad_checkpointing`` and ``num_classes``, which
      the trainer compares as resolved), ``train.zero_stage``, ``train.bf16``: refused (the saved
      weights or optimizer state do not fit); ``data.train_shards``, ``builtin_data.*``: refused (another
      data set: the data position and the keys already trained belong to the checkpoint's);
    - ``optim.*``, ``train.seed``, ``model.pretrained``, ``model.checkpoint``: the checkpoint's value
      stays in force (the optimizer, its schedule and the RNG are restored), so it is recorded;
    - operational keys (logging, saving, evaluation, paths): taken silently;
    - everything else (data, epochs, clipping, ...): the new value applies from the resumed step on.
    """
    old, new = _flat(saved), _flat(current.to_dict())
    changes = RecipeChanges(effective=current.to_dict())
    for key in sorted(set(old) | set(new)):
        before, now = old.get(key, "<unset>"), new.get(key, "<unset>")
        if before == now or key.startswith(NOT_COMPARED):
            continue
        line = f"{key}: {before!r} in the checkpoint, {now!r} now"
        if key.startswith(KEPT_FROM_CHECKPOINT):
            changes.kept.append(line)
            section, name = key.split(".", 1)
            if before == "<unset>":
                changes.effective[section].pop(name, None)
            else:
                changes.effective[section][name] = before
        elif key.startswith(REFUSED_ON_RESUME):
            changes.refused.append(line)
        else:
            changes.applied.append(line)
    return changes
