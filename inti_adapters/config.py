"""Typed, validated configuration for InTI layers and for ``inject``.

Every config is a dataclass that checks itself in ``__post_init__`` and round-trips through
JSON (``to_dict`` / ``from_dict``). Unknown keys from newer versions are reported, not
silently dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._config import Config, ConfigError, check_choice

CONTEXTS = ("token", "cube", "frame", "global")  # the paper's four (the default)
KERNELS = ("auto", "reference", "fused")
_context_names = list(CONTEXTS)  # what InTIConfig.contexts accepts, in canonical order


def register_context(name: str) -> None:
    """Let ``InTIConfig.contexts`` accept ``name``: a context defined in ``inti_adapters/inti.py``
    (its module docstring shows how to add one). Registering a known name again is a no-op."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a context name must be an identifier, got {name!r}")
    if name not in _context_names:
        _context_names.append(name)
FUSIONS = ("sep", "add", "cat")
HEADS = ("softmax", "sigmoid", "attention")
ODD_FRAME_POLICIES = ("repeat_last", "error")
LAYOUTS = ("NCTHW", "NTCHW")


@dataclass
class InTIConfig(Config):
    """Configuration of one InTI (inter-frame token interpolation) layer.

    The defaults are the paper's best setting: all four contexts, "Sep" fusion, softmax head,
    hidden width equal to the embedding width, a learnable temporal position table with a
    zero-initialised scale.
    """

    renamed = {"head": "weight_head"}  # older option names -> current ones (saved adapters keep loading)

    contexts: tuple[str, ...] = field(
        default=CONTEXTS,
        metadata={"help": "Context features used to predict the weights: any non-empty subset of "
                          "token, cube, frame, global (paper Table 5a), and of contexts added in inti.py."},
    )
    fusion: str = field(
        default="sep",
        metadata={"help": "How contexts are fused: 'sep' = [token ; sum(others)], 'add' = sum(all), "
                          "'cat' = concat(all) (paper Table 5b)."},
    )
    weight_head: str = field(
        default="softmax",
        metadata={"help": "Weight head: 'softmax' over two logits (weights sum to 1), 'sigmoid' per "
                          "logit, or 'attention' (learnable query dotted with per-frame features)."},
    )
    hidden_dim: int | None = field(
        default=None, metadata={"help": "Width C' of the context features; None = embedding width."}
    )
    max_frames: int = field(
        default=32,
        metadata={"help": "Rows of the temporal position table = the most output frames one layer "
                          "may produce. More output frames are refused with a clear error."},
    )
    temporal_embed: bool = field(
        default=True, metadata={"help": "Add alpha * E[t'] to the output (alpha starts at 0)."}
    )
    odd_frames: str = field(
        default="repeat_last",
        metadata={"help": "Odd frame counts: 'repeat_last' pairs the last frame with itself (it "
                          "passes unchanged); 'error' refuses odd counts."},
    )
    embed_init_std: float = field(
        default=0.02, metadata={"help": "Std of the truncated-normal init of the temporal table."}
    )
    head_init_std: float = field(
        default=0.0,
        metadata={"help": "Std of a normal init of the weight head's last layer (the query of the 'attention' "
                          "head). 0 (the paper's choice) = zeros: a fresh layer averages each pair exactly, and "
                          "the layers before the last get no gradient until it moves. With 'softmax' and "
                          "'attention' any value still keeps static videos unchanged (the weights sum to 1)."},
    )

    kernel: str = field(
        default="auto",
        metadata={"help": "How the layer is executed; the same function, outputs and gradients, and the same "
                          "saved weights either way. 'reference': the plain autograd formulation of inti.py. "
                          "'fused': the hand-fused CPU kernel (kernels/inti_cpu.py, custom autograd Functions; "
                          "the paper's four contexts only; under torch.compile with a clip length that is not "
                          "fixed inductor cannot lay out its frame pairs, a new T fails). 'auto': fused in eager mode on the CPU (fewer "
                          "operations per step), reference under torch.compile (inductor fuses the plain "
                          "operations itself; custom Functions would stop it) and on CUDA and other devices "
                          "(until GPU measurements of benchmarks/gpu_suite.py say otherwise)."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.contexts, str):
            self.contexts = (self.contexts,)
        self.contexts = tuple(self.contexts)
        if not self.contexts:
            raise ValueError(f"contexts must name at least one of {_context_names}, got an empty list")
        for c in self.contexts:
            check_choice("each entry of contexts", c, _context_names)
        if len(set(self.contexts)) != len(self.contexts):
            raise ValueError(f"contexts has duplicates: {list(self.contexts)}")
        # canonical order, so configs compare and serialise the same way
        self.contexts = tuple(c for c in _context_names if c in self.contexts)
        check_choice("fusion", self.fusion, FUSIONS)
        check_choice("kernel", self.kernel, KERNELS)
        check_choice("weight_head", self.weight_head, HEADS)
        check_choice("odd_frames", self.odd_frames, ODD_FRAME_POLICIES)
        if self.hidden_dim is not None and (not isinstance(self.hidden_dim, int) or self.hidden_dim < 1):
            raise ValueError(f"hidden_dim must be a positive int or None, got {self.hidden_dim!r}")
        if not isinstance(self.max_frames, int) or self.max_frames < 1:
            raise ValueError(f"max_frames must be a positive int, got {self.max_frames!r}")
        for name in ("embed_init_std", "head_init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")


@dataclass
class InjectConfig(Config):
    """What ``inject`` does to a backbone: where compressors go and how the video model behaves."""

    layers: tuple[int, ...] = field(
        default=(),
        metadata={"help": "0-based block indices; a compressor runs on the output of each of them. "
                          "[] is the naive frame-by-frame baseline."},
    )
    compressor: str = field(default="inti", metadata={"help": "Registered compressor name."})
    compressor_config: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Options of the compressor (InTIConfig fields for 'inti')."}
    )
    input_layout: str = field(
        default="NCTHW", metadata={"help": "Video layout: NCTHW (mmaction/pytorchvideo) or NTCHW."}
    )
    freeze_backbone: bool | None = field(
        default=None,
        metadata={"help": "Freeze the backbone's own weights so only added modules (InTI, temporal "
                          "adapters, peft adapters) and the head train. None = automatic: False for a "
                          "plain backbone (the paper fine-tunes everything), True for a peft model."},
    )
    train_head: bool = field(
        default=True, metadata={"help": "With freeze_backbone, keep the classifier head trainable."}
    )
    host: str | None = field(default=None, metadata={"help": "Force a registered host; None = detect."})
    temporal: str | tuple[dict[str, Any], ...] = field(
        default=(),
        metadata={"help": "Temporal adapters: a preset name of inti_adapters.temporal.PRESETS (e.g. "
                          "'uniformerv2_b'), or specs, each a dict with 'name' (registered adapter), 'blocks' "
                          "(indices, 'all' or {'last': k}) and 'placement', plus the adapter's options."},
    )

    def __post_init__(self) -> None:
        layers = self.layers
        if isinstance(layers, int) or not isinstance(layers, Sequence) or isinstance(layers, str):
            raise TypeError(f"layers must be a list of block indices such as [4, 6], got {layers!r}")
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"layers must hold ints, got {layers!r} (entry {i!r} is {type(i).__name__})")
            if i < 0:
                raise ValueError(
                    f"layers must be 0-based non-negative block indices, got {list(layers)} "
                    f"(negative index {i}; write the positive index instead)"
                )
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers has duplicates: {list(layers)}; each block can hold one compressor")
        if list(layers) != sorted(layers):
            raise ValueError(f"layers must be sorted ascending, got {list(layers)} (did you mean {sorted(layers)}?)")
        self.layers = tuple(layers)
        check_choice("input_layout", self.input_layout, LAYOUTS)
        self._check_temporal()
        if not isinstance(self.compressor_config, dict):
            raise TypeError(f"compressor_config must be a dict, got {type(self.compressor_config).__name__}")

    def _check_temporal(self) -> None:
        if isinstance(self.temporal, str):  # a preset name, resolved by the video model
            if not self.temporal:
                raise ConfigError("temporal must be a preset name, a list of adapter specs or [], got ''")
            return
        if isinstance(self.temporal, dict):
            self.temporal = (self.temporal,)
        self.temporal = tuple(dict(t) for t in self.temporal)
        for spec in self.temporal:
            if "name" not in spec:
                raise ValueError(f"each temporal adapter spec needs a 'name', got {spec!r}")

    def check_depth(self, depth: int) -> None:
        """Refuse layer indices the backbone does not have."""
        bad = [i for i in self.layers if i >= depth]
        if bad:
            raise ValueError(
                f"layers {list(self.layers)} out of range: the backbone has {depth} blocks "
                f"(valid indices 0..{depth - 1}), got {bad}"
            )
