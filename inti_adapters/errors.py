"""Exceptions raised by inti_adapters."""

from __future__ import annotations


class UnsupportedHostError(TypeError):
    """The model is not a known host and no registered host description matches it."""


class BareBackboneCallError(RuntimeError, ValueError):
    """The backbone was called directly while InTI hooks are installed on it.

    Inside an :class:`~inti_adapters.InTIModel` forward the hooks know the batch size and
    frame count of the video; a direct call to the backbone would silently mix frames of
    different samples. Call the video model, use ``model.disable_adapters()`` for image
    inference, or ``model.unload()`` to get the plain image model back.
    """
