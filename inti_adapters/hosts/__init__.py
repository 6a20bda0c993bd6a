"""Host descriptions for the ViT families inti_adapters can inject into."""

from ._base import Host, list_hosts, register_host, resolve_host
from . import timm as _timm  # noqa: F401  (registers the timm hosts)

__all__ = ["Host", "list_hosts", "register_host", "resolve_host"]
