"""Deployment: ``torch.export`` and ONNX of an injected model, with a dynamic batch size.

    >>> import torch, inti_adapters as ia
    >>> from timm.models.vision_transformer import VisionTransformer
    >>> vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    >>> model = ia.inject(vit, layers=[0]).eval()
    >>> program = ia.export_program(model, torch.randn(2, 3, 4, 16, 16))   # torch.export.ExportedProgram
    >>> program.module()(torch.randn(5, 3, 4, 16, 16)).shape               # any batch size
    torch.Size([5, 3])
    >>> program.module()(torch.randn(5, 3, 8, 16, 16))                     # not another clip length
    Traceback (most recent call last):
    ...
    inti_adapters.export.ProgramInputError: the exported program takes videos of shape (B, 3, 4, 16, 16) float32 with 1 <= B <= 65536 (the frame count and frame size are fixed when exporting); got (5, 3, 8, 16, 16) float32: dim 2 is 8, not 4. Export again with a video of that shape: ia.export_program(model, video)

What exports: every built-in compressor (``inti``, ``linear_pool``, ``conv_pool`` and ``tome``, whose
merging keeps a fixed ``r`` tokens per layer, so every shape is known), every temporal adapter,
and LoRA / other peft tuners, which are merged into the weights first (peft's ``merge_adapter``, in a
copy: the model passed to :func:`export_program` keeps its tuners unmerged, its weights bit for bit
and the training mode of each module). The batch size is dynamic; the frame count and frame size are those of the example
video (the frame schedule depends on them): the program's ``module()`` checks each video first and
refuses another shape with a one-line :class:`ProgramInputError` (expected and received) instead of
torch's guard failure. :func:`load_program` loads a saved program (``torch.export.save``) with the
same check. A compressor or temporal adapter that declares
``exportable = False`` is refused with an :class:`ExportError` naming it; any failure of
``torch.export`` is reported with the model's extensions. The exported program is checked against
the eager model on the example video (``check=True``); an output or a difference that is not finite
(NaN, inf: e.g. the weights of a run that diverged) fails the check.

ONNX (``pip install 'inti-adapters[export]'``: onnx, onnxscript, onnxruntime) goes through the
same exported program (``torch.onnx.export(program, dynamo=True)``) and is checked with
onnxruntime on the CPU when it is installed. ``opset_version`` must lie in the range the exporter
can write (:func:`supported_opsets`; others are refused before anything is written), and the file
appears at its path only once it is written and checked. ``inti-export`` does both from a recipe and a saved
adapter (:mod:`inti_adapters.train.export_cli`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._peft import is_peft_model, unwrap_peft
from .model import InTIModel
from .surgery import check_calls

__all__ = ["ExportError", "ProgramInputError", "VideoProgram", "export_onnx", "export_program", "load_program",
           "onnx_difference", "prepare_for_export", "supported_opsets"]

_INSTALL = "pip install 'inti-adapters[export]' (onnx, onnxscript, onnxruntime)"


class ExportError(RuntimeError):
    """The model cannot be exported, or the exported model does not compute what the eager one does."""


class ProgramInputError(ValueError):
    """A video of another shape or dtype than the exported program was made for (frames and frame size
    are fixed when exporting; the batch size varies within its range)."""


def _input_spec(program: torch.export.ExportedProgram) -> tuple[str, tuple[Any, ...], torch.dtype] | None:
    """``(name, shape, dtype)`` of the program's one tensor input, a dimension being an int or a
    ``(symbol, low, high)`` range; None for another signature (then nothing is checked)."""
    names = program.graph_signature.user_inputs
    if len(names) != 1:
        return None
    node = next((n for n in program.graph.nodes if n.op == "placeholder" and n.name == names[0]), None)
    value = None if node is None else node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    shape: list[Any] = []
    for i, size in enumerate(value.shape):
        if isinstance(size, torch.SymInt):
            bounds = program.range_constraints.get(size.node.expr)
            low, high = (int(bounds.lower), bounds.upper) if bounds is not None else (0, math.inf)
            high = int(high) if math.isfinite(float(high)) else math.inf
            shape.append(("B" if i == 0 else str(size.node.expr), low, high))
        else:
            shape.append(int(size))
    return names[0], tuple(shape), value.dtype


def _describe_spec(shape: tuple[Any, ...], dtype: torch.dtype) -> str:
    dims = ", ".join(d[0] if isinstance(d, tuple) else str(d) for d in shape)
    ranges = [f"{low} <= {name} <= {high}" for name, low, high in (d for d in shape if isinstance(d, tuple))]
    return f"({dims}) {str(dtype).removeprefix('torch.')}" + (f" with {', '.join(ranges)}" if ranges else "")


def _check_video(spec: tuple[str, tuple[Any, ...], torch.dtype], video: torch.Tensor) -> None:
    """:class:`ProgramInputError` unless ``video`` fits ``spec`` (see :func:`_input_spec`)."""
    _, shape, dtype = spec
    expected = _describe_spec(shape, dtype)
    got = f"{tuple(video.shape)} {str(video.dtype).removeprefix('torch.')}"
    wrong = []
    if video.dim() != len(shape):
        wrong.append(f"{video.dim()} dimensions, not {len(shape)}")
    else:
        for i, (want, size) in enumerate(zip(shape, video.shape, strict=True)):
            if isinstance(want, tuple) and not want[1] <= size <= want[2]:
                wrong.append(f"dim {i} ({want[0]}) is {size}, not in [{want[1]}, {want[2]}]")
            elif isinstance(want, int) and size != want:
                wrong.append(f"dim {i} is {size}, not {want}")
    if video.dtype != dtype:
        wrong.append(f"dtype {str(video.dtype).removeprefix('torch.')}, not {str(dtype).removeprefix('torch.')}")
    if wrong:
        raise ProgramInputError(
            f"the exported program takes videos of shape {expected} (the frame count and frame size are fixed when "
            f"exporting); got {got}: {'; '.join(wrong)}. Export again with a video of that shape: "
            "ia.export_program(model, video)")


class _CheckInput:
    """The check :meth:`VideoProgram.module` puts before the module's forward (and torch's own guards)."""

    def __init__(self, spec: tuple[str, tuple[Any, ...], torch.dtype]) -> None:
        self.spec = spec

    def __call__(self, args: tuple, kwargs: dict) -> None:
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):  # the video, as exported
            _check_video(self.spec, args[0])  # other calls meet torch's check of the input structure


class VideoProgram(torch.export.ExportedProgram):
    """The ``torch.export.ExportedProgram`` of :func:`export_program` and :func:`load_program`: the same
    program (``torch.export.save``, ``torch.onnx.export`` and everything else take it as it is), whose
    :meth:`module` checks each video's shape and dtype first and refuses another one with a
    one-line :class:`ProgramInputError` instead of torch's guard failure."""

    def module(self, *args: Any, **kwargs: Any) -> nn.Module:
        module = super().module(*args, **kwargs)
        spec = _input_spec(self)
        if spec is not None:
            check_calls(module, _CheckInput(spec))
        return module


def _as_video_program(program: torch.export.ExportedProgram) -> VideoProgram:
    program.__class__ = VideoProgram  # adds a method only: the state is the ExportedProgram's own
    return program  # type: ignore[return-value]


def load_program(path: str | os.PathLike, **load_options: Any) -> VideoProgram:
    """``torch.export.load`` of a saved program (``.pt2``, e.g. from ``inti-export``) whose ``module()``
    checks each video's shape first (:class:`VideoProgram`); ``load_options`` go to ``torch.export.load``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported program at {path} (a .pt2 file from torch.export.save or inti-export)")
    return _as_video_program(torch.export.load(str(path), **load_options))


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


def _check_close(what: str, got: torch.Tensor, reference: torch.Tensor, atol: float, *,
                 against: str = "the eager model", hint: str = "") -> None:
    """:class:`ExportError` unless both outputs are finite and differ by at most ``atol``
    (``nan > atol`` is False: a NaN difference must not pass)."""
    for name, out in ((what, got), (against, reference)):
        bad = int((~torch.isfinite(out.detach())).sum())
        if bad:
            raise ExportError(f"{name} gives {bad} non-finite values (NaN or inf) of {out.numel()} on the example "
                              "video: the check cannot compare it; are the weights finite (a run that diverged)?")
    diff = _max_difference(got, reference)
    if not diff <= atol:
        raise ExportError(f"{what} differs from {against} by {diff:.3g} (> {atol}){hint}")


@contextlib.contextmanager
def _modes_kept(model: nn.Module) -> Iterator[None]:
    """Restore the training flag of every module of ``model`` on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _has_peft_tuners(model: nn.Module) -> bool:
    return is_peft_model(model) or is_peft_model(getattr(unwrap_peft(model), "backbone", None))


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
    tuned = [m for m in (model, inner.backbone) if is_peft_model(m)]  # LoRA after inject, LoRA before inject
    for m in tuned:
        m.merge_adapter()  # weights merged, modules kept: the surgery's overrides on them stay
    model = inner
    _check_exportable(model)
    if not tuned:
        return model
    with torch.no_grad():
        _check_close("the model with its peft tuners merged", model(video), before, atol, against="the unmerged model",
                     hint="; export the unmerged model with merge=False")
    return model


def export_program(model: nn.Module, video: torch.Tensor, *, dynamic_batch: bool = True, merge: bool = True,
                   check: bool = True, atol: float = 1e-4) -> VideoProgram:
    """``torch.export.export`` of an injected model, for videos shaped like ``video`` (any batch size).

    Args:
        model: An ``InTIModel`` or a ``PeftModel`` around one (see :func:`prepare_for_export`).
        video: An example input ``(B, 3, T, H, W)`` (or the model's layout); ``T``, ``H``, ``W`` are fixed.
        dynamic_batch: Let the batch size vary (``torch.export.Dim``); else it is ``B``.
        merge: Merge peft tuners into the weights first (in a copy: ``model`` is left as it was).
        check: Compare the program with the eager model on ``video`` (max abs difference ``atol``;
            a NaN or inf output fails).

    ``model`` is put in eval mode for the export; every module's training flag is restored afterwards.

    Returns:
        A :class:`VideoProgram` (a ``torch.export.ExportedProgram``): ``program.module()(video)`` runs it
        and refuses a video of another shape (frame count, frame size) with a :class:`ProgramInputError`.

    Raises:
        ExportError: An extension that does not export, a ``torch.export`` failure, or a mismatch.
    """
    with _modes_kept(model):
        if merge and _has_peft_tuners(model):  # merging changes the weights: work on a copy
            model = prepare_for_export(copy.deepcopy(model), video, atol=atol)
        else:
            model = prepare_for_export(model, video, atol=atol) if merge else model.eval()
        return _export(model, video, dynamic_batch, check, atol)


def _export(model: nn.Module, video: torch.Tensor, dynamic_batch: bool, check: bool,
            atol: float) -> VideoProgram:
    if dynamic_batch and video.shape[0] < 2:  # sizes 0 and 1 are specialised while tracing
        video = video.expand(2, *video.shape[1:]).contiguous()
    dims = ({0: torch.export.Dim("batch", min=1, max=1 << 16)},) if dynamic_batch else None
    inner = model if isinstance(model, InTIModel) else None
    try:
        program = torch.export.export(model, (video,), dynamic_shapes=dims)
    except Exception as e:
        where = _extensions(inner) if inner is not None else type(model).__name__
        raise ExportError(f"torch.export could not capture the model ({where}): {type(e).__name__}: {e}") from e
    program = _as_video_program(program)
    if check:
        with torch.no_grad():
            _check_close("the exported program", program.module()(video), model(video), atol)
    return program


def supported_opsets() -> range:
    """The ONNX opsets :func:`export_onnx` can write: torch's exporter builds opset 18 and converts it
    with onnxscript's version converter, which only goes up (to its newest supported opset); asking
    for another one would silently write opset 18 or an invalid file."""
    try:
        from onnxscript.version_converter import _version_converter as converter
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx and onnxscript: {_INSTALL}") from e
    return range(getattr(converter, "SUPPORTED_MIN_ONNX_OPSET", 18), getattr(converter, "SUPPORTED_MAX_ONNX_OPSET", 18) + 1)


def _check_opset(opset: Any) -> None:
    if opset is None:
        return
    ok = supported_opsets()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in ok:
        raise ExportError(f"opset_version={opset!r} cannot be exported: this torch and onnxscript write ONNX opsets "
                          f"{ok.start} to {ok.stop - 1} (an older opset would silently be written as {ok.start}, a newer "
                          "one as an invalid file); nothing was written")


def _written_opset(onnx_program: Any) -> int | None:
    return next((o.version for o in onnx_program.model_proto.opset_import if o.domain in ("", "ai.onnx")), None)


def export_onnx(model: nn.Module | torch.export.ExportedProgram, video: torch.Tensor, path: str | os.PathLike, *,
                dynamic_batch: bool = True, check: bool = True, atol: float = 1e-4, optimize: bool = True,
                **export_options: Any) -> Path:
    """Write ``model`` as ONNX to ``path`` (input ``video``, output ``output``; batch dynamic by default).

    ``model`` may be an exported program from :func:`export_program` (then ``video`` is only the
    check input). With ``check`` and onnxruntime installed, the ONNX model is run on the CPU on
    ``video`` and compared with the eager (or exported) model. ``export_options`` go to
    ``torch.onnx.export`` (e.g. ``opset_version``, one of :func:`supported_opsets`; others raise
    :class:`ExportError` before anything is written). The file is written beside ``path`` and moved
    there only once it is complete and checked: a failure leaves no file (and an existing one as it was).
    """
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx and onnxscript: {_INSTALL}") from e
    _check_opset(export_options.get("opset_version"))
    program = model if isinstance(model, torch.export.ExportedProgram) else export_program(
        model, video, dynamic_batch=dynamic_batch, check=check, atol=atol)
    onnx_program = torch.onnx.export(program, dynamo=True, input_names=["video"], output_names=["output"],
                                     optimize=optimize, verbose=False, **export_options)
    wanted, written = export_options.get("opset_version"), _written_opset(onnx_program)
    if wanted is not None and written != wanted:
        raise ExportError(f"opset_version={wanted} was asked for but the exporter produced opset {written}; "
                          "nothing was written")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:  # saved under its final name (external data files refer to it), checked, then moved
        onnx_program.save(str(staging / path.name))
        if check:
            _check_onnx(staging / path.name, program, video, atol)
        for item in sorted(staging.iterdir(), key=lambda p: p.name == path.name):  # the model file last
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _check_onnx(path: Path, program: torch.export.ExportedProgram, video: torch.Tensor, atol: float) -> None:
    diff = onnx_difference(path, program.module(), video)
    if diff is not None and not diff <= atol:
        what = "is not finite (the ONNX model or the program gives NaN or inf)" if not math.isfinite(diff) else (
            f"is {diff:.3g} (> {atol})")
        raise ExportError(f"the ONNX model's largest difference from the exported program {what}")


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
