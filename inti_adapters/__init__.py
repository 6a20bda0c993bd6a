"""inti_adapters: InTI (inter-frame token interpolation) for image ViTs on video.

    >>> import inti_adapters as ia
    >>> model = ia.inject(vit, layers=[4, 6])   # doctest: +SKIP
"""

from ._version import __version__
from .compressors import Compressor, list_compressors, register_compressor
from .config import InjectConfig, InTIConfig
from .context import TokenLayout, VideoContext
from .errors import BareBackboneCallError, UnsupportedHostError
from .flops import FlopCounter, count_gflops
from .hosts import Host, list_hosts, register_host
from .inti import InTILayer
from .lora import add_lora, lora_preset
from .model import InTIModel, inject
from .planning import PlanEntry, format_plan, plan
from .serialization import load_pretrained, save_pretrained
from .temporal import (
    GlobalTemporalAdapter,
    TemporalAdapter,
    list_temporal_adapters,
    register_temporal_adapter,
)
from .video import normalize_video
from .zero_shot import ZeroShotHead, build_zero_shot_classifier, zero_shot_logits

__all__ = [
    "BareBackboneCallError",
    "Compressor",
    "FlopCounter",
    "GlobalTemporalAdapter",
    "Host",
    "InTIConfig",
    "InTILayer",
    "InTIModel",
    "InjectConfig",
    "PlanEntry",
    "TemporalAdapter",
    "TokenLayout",
    "UnsupportedHostError",
    "VideoContext",
    "ZeroShotHead",
    "__version__",
    "add_lora",
    "build_zero_shot_classifier",
    "count_gflops",
    "format_plan",
    "inject",
    "list_compressors",
    "list_hosts",
    "list_temporal_adapters",
    "load_pretrained",
    "lora_preset",
    "normalize_video",
    "plan",
    "register_compressor",
    "register_host",
    "register_temporal_adapter",
    "save_pretrained",
    "zero_shot_logits",
]
