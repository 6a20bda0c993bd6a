"""Deployment: ``torch.export`` and ONNX of an injected model, with a dynamic batch size.

    >>> import torch, inti_adapters as ia
    >>> from timm.models.vision_transformer import VisionTransformer
    >>> vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    >>> model = ia.inject(vit, layers=[0]).eval()
    >>> program = ia.export_program(model, torch.randn(2, 3, 4, 16, 16))   # torch.export.ExportedProgram
    >>> program.module()(torch.randn(5, 3, 4, 16, 16)).shape               # any batch size
    torch.Size([5, 3])

What exports: every built-in compressor (``inti``, ``linear_pool``, ``conv_pool`` and ``tome``, whose
merging keeps a fixed ``r`` tokens per layer, so every shape is known), every temporal adapter,
and LoRA / other peft tuners, which are merged into the weights first (in place, peft's
``merge_adapter``). The batch size is dynamic; the frame count and frame size are those of the example
video (the frame schedule depends on them). A compressor or temporal adapter that declares
``exportable = False`` is refused with an :class:`ExportError` naming it; any failure of
``torch.export`` is reported with the model's extensions. The exported program is checked against
the eager model on the example video (``check=True``).

ONNX (``pip install 'inti-adapters[export]'``: onnx, onnxscript, onnxruntime) goes through the
same exported program (``torch.onnx.export(program, dynamo=True)``) and is checked with
onnxruntime on the CPU when it is installed. ``inti-export`` does both from a recipe and a saved
adapter (:mod:`inti_adapters.train.export_cli`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._peft import is_peft_model, unwrap_peft
from .model import InTIModel

__all__ = ["ExportError", "export_onnx", "export_program", "onnx_difference", "prepare_for_export"]

_INSTALL = "pip install 'inti-adapters[export]' (onnx, onnxscript, onnxruntime)"


class ExportError(RuntimeError):
    """The model cannot be exported, or the exported model does not compute what the eager one does."""


def _extensions(model: InTIModel) -> str:
    temporal = sorted({type(m).__name__ for m in model.temporal.values()}) if len(model.temporal) else []
    return f"compressor {model.config.compressor!r} on layers {list(model.layers)}, temporal adapters {temporal}"


def _check_exportable(model: InTIModel) -> None:
    refused = [f"compressor {model.config.compressor!r} ({type(m).__name__})" for m in model.compressors.values()
               if not getattr(m, "exportable", True)]
    refused += [f"temporal adapter {type(m).__name__}" for m in model.temporal.values()
                if not getattr(m, "exportable", True)]
    if refused:
        raise ExportError(f"{sorted(set(refused))} declare exportable = False: their forward cannot be captured by "
                          "torch.export (shapes that depend on the data). Export a model without them.")


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def prepare_for_export(model: nn.Module, video: torch.Tensor, *, atol: float = 1e-4) -> InTIModel:
    """The ``InTIModel`` to export: peft tuners merged into the weights (in place), eval mode.

    ``model`` is an ``InTIModel`` (LoRA before ``inject`` lives in its backbone) or a ``PeftModel``
    around one (LoRA after ``inject``). Tuners are merged with peft's ``merge_adapter()``, which
    keeps the modules (``merge_and_unload()`` would replace modules that the surgery layer may
    have changed, e.g. token merging's key capture on ``qkv``); ``unmerge_adapter()`` undoes it.
    The merged model is checked against the unmerged one on ``video``: :class:`ExportError` if
    they differ by more than ``atol``.
    """
    inner = unwrap_peft(model)
    if not isinstance(inner, InTIModel):
        raise TypeError(f"export expects an InTIModel (from inject / load_pretrained) or a PeftModel around one, "
                        f"got {type(inner).__name__}")
    model.eval()
    with torch.no_grad():
        before = model(video)
    for tuned in (model, inner.backbone):  # LoRA after inject, LoRA before inject
        if is_peft_model(tuned):
            tuned.merge_adapter()  # weights merged, modules kept: the surgery's overrides on them stay
    model = inner
    _check_exportable(model)
    with torch.no_grad():
        diff = _max_difference(model(video), before)
    if diff > atol:
        raise ExportError(f"merging the peft tuners changed the output by {diff:.3g} (> {atol}); "
                          "export the unmerged model with merge=False")
    return model


def export_program(model: nn.Module, video: torch.Tensor, *, dynamic_batch: bool = True, merge: bool = True,
                   check: bool = True, atol: float = 1e-4) -> torch.export.ExportedProgram:
    """``torch.export.export`` of an injected model, for videos shaped like ``video`` (any batch size).

    Args:
        model: An ``InTIModel`` or a ``PeftModel`` around one (see :func:`prepare_for_export`).
        video: An example input ``(B, 3, T, H, W)`` (or the model's layout); ``T``, ``H``, ``W`` are fixed.
        dynamic_batch: Let the batch size vary (``torch.export.Dim``); else it is ``B``.
        merge: Merge peft tuners into the weights first (in place).
        check: Compare the program with the eager model on ``video`` (max abs difference ``atol``).

    Raises:
        ExportError: An extension that does not export, a ``torch.export`` failure, or a mismatch.
    """
    model = prepare_for_export(model, video, atol=atol) if merge else model.eval()
    if dynamic_batch and video.shape[0] < 2:  # sizes 0 and 1 are specialised while tracing
        video = video.expand(2, *video.shape[1:]).contiguous()
    dims = ({0: torch.export.Dim("batch", min=1, max=1 << 16)},) if dynamic_batch else None
    inner = model if isinstance(model, InTIModel) else None
    try:
        program = torch.export.export(model, (video,), dynamic_shapes=dims)
    except Exception as e:
        where = _extensions(inner) if inner is not None else type(model).__name__
        raise ExportError(f"torch.export could not capture the model ({where}): {type(e).__name__}: {e}") from e
    if check:
        with torch.no_grad():
            diff = _max_difference(program.module()(video), model(video))
        if diff > atol:
            raise ExportError(f"the exported program differs from the eager model by {diff:.3g} (> {atol})")
    return program


def export_onnx(model: nn.Module | torch.export.ExportedProgram, video: torch.Tensor, path: str | os.PathLike, *,
                dynamic_batch: bool = True, check: bool = True, atol: float = 1e-4, optimize: bool = True,
                **export_options: Any) -> Path:
    """Write ``model`` as ONNX to ``path`` (input ``video``, output ``output``; batch dynamic by default).

    ``model`` may be an exported program from :func:`export_program` (then ``video`` is only the
    check input). With ``check`` and onnxruntime installed, the ONNX model is run on the CPU on
    ``video`` and compared with the eager (or exported) model. ``export_options`` go to
    ``torch.onnx.export`` (e.g. ``opset_version``).
    """
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx and onnxscript: {_INSTALL}") from e
    program = model if isinstance(model, torch.export.ExportedProgram) else export_program(
        model, video, dynamic_batch=dynamic_batch, check=check, atol=atol)
    onnx_program = torch.onnx.export(program, dynamo=True, input_names=["video"], output_names=["output"],
                                     optimize=optimize, verbose=False, **export_options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(path))
    if check:
        diff = onnx_difference(path, program.module(), video)
        if diff is not None and diff > atol:
            raise ExportError(f"the ONNX model differs from the exported program by {diff:.3g} (> {atol})")
    return path


def onnx_difference(path: str | os.PathLike, reference: Any, video: torch.Tensor) -> float | None:
    """Max abs difference between onnxruntime (CPU) on ``path`` and ``reference(video)``; None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: video.detach().cpu().float().numpy()})
    with torch.no_grad():
        return _max_difference(torch.from_numpy(out), reference(video).cpu())
