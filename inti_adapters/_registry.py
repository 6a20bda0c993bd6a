"""One registry mechanism for hosts, compressors and temporal adapters (timm ``_registry`` style)."""

from __future__ import annotations

from typing import Any


class Registry(dict):
    """Name -> class, with a duplicate check, a base-class check and errors that list the names.

    A plain ``dict`` underneath, in registration order (detection order for hosts).
    """

    def __init__(self, kind: str, base: type | tuple[type, ...], decorator: str) -> None:
        super().__init__()
        self.kind, self.base, self.decorator = kind, base, decorator

    def add(self, name: str, cls: Any) -> Any:
        if name in self:
            raise ValueError(f"a {self.kind} named {name!r} is already registered ({self[name].__name__})")
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            bases = self.base if isinstance(self.base, tuple) else (self.base,)
            raise TypeError(f"{self.decorator} expects a {' or '.join(b.__name__ for b in bases)} subclass, "
                            f"got {cls!r}")
        self[name] = cls
        return cls

    def lookup(self, name: str, names: list[str] | None = None) -> Any:
        try:
            return self[name]
        except KeyError:
            shown = list(self) if names is None else names
            raise ValueError(f"unknown {self.kind} {name!r}; registered {self.kind}s: {shown}") from None
