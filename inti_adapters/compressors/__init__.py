"""Ways to shrink the forward pass of a ViT on video, all behind ``inject(..., compressor=name)``."""

from ._base import (
    Compressor,
    build_compressor,
    get_compressor,
    list_compressors,
    make_compressor_config,
    register_compressor,
)

__all__ = ["Compressor", "build_compressor", "make_compressor_config", "get_compressor", "list_compressors", "register_compressor"]

# built-in compressors register themselves on import (InTI registers from inti_adapters.inti)
from . import conv_pool, linear_pool, tome  # noqa: E402,F401
