"""Host descriptions for the ViT families inti_adapters can inject into."""

from . import open_clip as _open_clip  # noqa: F401  (OpenCLIP hosts; never imports open_clip itself)
from . import timm as _timm  # noqa: F401  (registers the timm hosts)
from ._base import Host, list_hosts, register_host, resolve_host

__all__ = ["Host", "list_hosts", "register_host", "resolve_host"]
