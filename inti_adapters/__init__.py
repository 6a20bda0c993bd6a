"""inti_adapters: InTI (inter-frame token interpolation) for image ViTs on video.

    >>> import timm, torch, inti_adapters as ia
    >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=4, num_classes=3)
    >>> model = ia.inject(vit, layers=[1, 2])
    >>> model(torch.randn(2, 3, 8, 32, 32)).shape
    torch.Size([2, 3])
    >>> model.frame_schedule(8)
    [8, 8, 4, 2]
"""

from ._version import __version__
from .compressors import Compressor, list_compressors, register_compressor
from .config import InjectConfig, InTIConfig
from .context import VideoContext
from .errors import BareBackboneCallError, UnsupportedHostError
from .export import ExportError, ProgramInputError, export_onnx, export_program, load_program
from .flops import FlopCounter, count_gflops
from .hosts import Host, list_hosts, register_host
from .inti import InTILayer
from .lora import add_lora, lora_preset
from .model import InTIModel, inject
from .planning import PlanEntry, format_plan, plan, r_for_budget
from .serialization import load_pretrained, push_to_hub, save_pretrained
from .surgery import Site
from .temporal import (
    GlobalTemporalAdapter,
    TemporalAdapter,
    list_temporal_adapters,
    register_temporal_adapter,
)
from .tokens import TokenLayout
from .video import normalize_video
from .zero_shot import ZeroShotHead, build_zero_shot_classifier, zero_shot_logits

__all__ = [
    "BareBackboneCallError",
    "Compressor",
    "ExportError",
    "FlopCounter",
    "GlobalTemporalAdapter",
    "Host",
    "InTIConfig",
    "InTILayer",
    "InTIModel",
    "InjectConfig",
    "PlanEntry",
    "ProgramInputError",
    "Site",
    "TemporalAdapter",
    "TokenLayout",
    "UnsupportedHostError",
    "VideoContext",
    "ZeroShotHead",
    "__version__",
    "add_lora",
    "build_zero_shot_classifier",
    "count_gflops",
    "export_onnx",
    "export_program",
    "format_plan",
    "inject",
    "list_compressors",
    "list_hosts",
    "list_temporal_adapters",
    "load_pretrained",
    "load_program",
    "lora_preset",
    "normalize_video",
    "plan",
    "push_to_hub",
    "r_for_budget",
    "register_compressor",
    "register_host",
    "register_temporal_adapter",
    "save_pretrained",
    "zero_shot_logits",
]
