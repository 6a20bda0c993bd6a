"""Where a training step's time and GFLOPs go, by component of an ``InTIModel``.

Components: ``blocks`` (the backbone's transformer blocks), ``compressors`` (InTI layers or
another frame compressor), ``temporal adapters``, ``head/pool`` (final norm, per-frame pooling,
frame average, head) and ``other`` (patch embedding, loss, autograd bookkeeping, Python glue).

Both measures run the model with the components' modules probed (``inti_adapters.surgery.probe``,
outermost, so a block's range wraps the sites installed on it) to keep a stack of the components
running; work is charged to the innermost one (a temporal adapter called from a block's site is
the adapter's, not the block's).

- GFLOPs (:func:`component_gflops`): :class:`inti_adapters.FlopCounter` on the meta device; the
  count since the previous hook boundary goes to the component on top of the stack.
- Time (:func:`component_times`): one forward + backward under ``torch.profiler``, the hooks
  opening a ``record_function`` range per component call. Forward: each range's wall time minus
  the ranges nested in it (Python glue included). Backward: every autograd node
  (``autograd::engine::evaluate_function: ...``) is charged, with everything it runs, to the
  component whose forward op created it (same thread and sequence number). ``other`` is the
  profiled step minus the components, so the parts add up to the step by construction. On CUDA
  the kernels' device time replaces wall time (each kernel charged through the op that launched it).
  On the CPU the time of the matrix products and convolutions (the ops that GFLOPs count) is also
  charged this way, under ``PRODUCTS + component``: how much of a component's time its FLOPs explain.

The profiler's own overhead (a few microseconds per op) lands on every component in proportion to
its op count; the InTI layers have more ops per FLOP than the blocks, so their share is, if
anything, overstated.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.autograd import DeviceType

import inti_adapters as ia
from inti_adapters.surgery import probe

COMPONENTS = ("blocks", "compressors", "temporal adapters", "head/pool", "other")
_RANGE = "component::"
_BACKWARD_NODE = "autograd::engine::evaluate_function: "
PRODUCTS = "products:"  # component_times' keys for the seconds in matrix products and convolutions
_PRODUCT_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
                          "aten::convolution_backward", "aten::_slow_conv2d_forward", "aten::slow_conv3d_forward"})


def component_modules(model: ia.InTIModel) -> dict[str, list[nn.Module]]:
    """The modules whose forward belongs to each component (``head/pool`` also gets ``forward_head``)."""
    from inti_adapters.temporal._base import GlobalTemporalAdapter, TemporalAdapter

    adapters = [m for m in model.temporal.modules() if isinstance(m, (TemporalAdapter, GlobalTemporalAdapter))]
    norm = getattr(model.backbone, "norm", None)
    return {"blocks": list(model.host.blocks), "compressors": list(model.compressors.values()),
            "temporal adapters": adapters, "head/pool": [norm] if isinstance(norm, nn.Module) else []}


class ComponentTracker:
    """Forward hooks that track the running component (innermost wins).

    Args:
        model: The video model.
        on_boundary: Called with the component on top of the stack (``"other"`` when none) just
            before every component call starts or ends.
        ranges: Also open a ``record_function("component::<name>")`` range per component call.
    """

    def __init__(self, model: ia.InTIModel, on_boundary: Callable[[str], None] | None = None,
                 ranges: bool = False) -> None:
        self.model = model
        self.on_boundary = on_boundary
        self.ranges = ranges
        self.stack: list[tuple[str, Any]] = []

    def _enter(self, name: str) -> None:
        if self.on_boundary:
            self.on_boundary(self.stack[-1][0] if self.stack else "other")
        rf = torch.autograd.profiler.record_function(_RANGE + name) if self.ranges else None
        if rf is not None:
            rf.__enter__()
        self.stack.append((name, rf))

    def _exit(self, name: str) -> None:
        if self.on_boundary:
            self.on_boundary(name)
        top, rf = self.stack.pop()
        assert top == name, f"component calls not nested: leaving {name} inside {top}"
        if rf is not None:
            rf.__exit__(None, None, None)

    def __enter__(self) -> ComponentTracker:
        names = {id(m): name for name, mods in component_modules(self.model).items() for m in mods}
        modules = [m for mods in component_modules(self.model).values() for m in mods]
        self._probe = probe(modules, before=lambda m, a, k: self._enter(names[id(m)]),
                            after=lambda m, out: self._exit(names[id(m)]))
        self._probe.__enter__()  # outermost: a block's range wraps the sites installed on it
        head = self.model.forward_head  # the bound method; an instance attribute shadows it while tracking

        def forward_head(*args: Any, **kwargs: Any) -> Any:
            self._enter("head/pool")
            try:
                return head(*args, **kwargs)
            finally:
                self._exit("head/pool")

        self.model.forward_head = forward_head
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.model.forward_head
        self._probe.__exit__(*exc)


def component_gflops(model: ia.InTIModel, video: torch.Tensor) -> dict[str, float]:
    """GFLOPs (multiply-adds, paper convention) of one forward by component, for the whole batch."""
    counter = ia.FlopCounter()
    totals: dict[str, float] = defaultdict(float)
    last = [0]

    def boundary(top: str) -> None:
        now = counter.get_total_flops()
        totals[top] += (now - last[0]) / 2e9
        last[0] = now

    with torch.no_grad(), counter, ComponentTracker(model, on_boundary=boundary):
        model(video)
    boundary("other")
    return {c: totals.get(c, 0.0) for c in COMPONENTS}


def _is_product(name: str) -> bool:
    """A matrix product or convolution kernel: the ops that GFLOPs count."""
    return name in _PRODUCT_OPS or name.startswith(("aten::_scaled_dot_product", "aten::_flash_attention"))


def _ancestors(evt: Any) -> Iterator[Any]:
    evt = evt.cpu_parent
    while evt is not None:
        yield evt
        evt = evt.cpu_parent


def _innermost(evt: Any) -> str | None:
    """The component range that encloses a profiler event (itself included), or None."""
    while evt is not None:
        if evt.name.startswith(_RANGE):
            return evt.name[len(_RANGE):]
        evt = evt.cpu_parent
    return None


def _backward_node(evt: Any) -> Any:
    """The outermost autograd-node event enclosing ``evt`` (itself included), or None."""
    node = None
    while evt is not None:
        if evt.name.startswith(_BACKWARD_NODE):
            node = evt
        evt = evt.cpu_parent
    return node


def _owner(evt: Any, owner_of_seq: dict[tuple[int, int], str]) -> str:
    """The component an event is charged to: in the backward, the one whose forward op created the
    enclosing autograd node; in the forward, the innermost component range."""
    node = _backward_node(evt)
    who = owner_of_seq.get((node.fwd_thread, node.sequence_nr), "other") if node else _innermost(evt)
    return who or "other"


@contextmanager
def _profiled(model: ia.InTIModel, device: torch.device) -> Iterator[Any]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with ComponentTracker(model, ranges=True), profile(activities=acts) as prof:
        yield prof


def component_times(model: ia.InTIModel, fwd_bwd: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Seconds of one ``fwd_bwd()`` (forward + backward, no optimizer step) by component; ``total`` too."""
    with _profiled(model, device) as prof:
        with torch.autograd.profiler.record_function("step::fwd_bwd"):
            fwd_bwd()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]  # ops; kernels hang off them
    owner_of_seq: dict[tuple[int, int], str] = {}
    for e in events:
        if e.sequence_nr >= 0 and _backward_node(e) is None:
            owner_of_seq.setdefault((e.thread, e.sequence_nr), _innermost(e) or "other")
    out: dict[str, float] = defaultdict(float)
    if device.type == "cuda":  # kernel time, charged through the op that launched it
        for e in events:
            out[_owner(e, owner_of_seq)] += e.self_device_time_total / 1e6
        total = sum(out.values())
    else:
        for e in events:
            if e.name.startswith(_RANGE) and _backward_node(e) is None:  # forward: range minus nested ranges
                out[_innermost(e)] += e.cpu_time_total / 1e6
                outer = _innermost(e.cpu_parent)
                if outer is not None:
                    out[outer] -= e.cpu_time_total / 1e6
            elif e.name.startswith(_BACKWARD_NODE) and _backward_node(e.cpu_parent) is None:
                out[owner_of_seq.get((e.fwd_thread, e.sequence_nr), "other")] += e.cpu_time_total / 1e6
            if _is_product(e.name) and not any(_is_product(a.name) for a in _ancestors(e)):
                out[PRODUCTS + _owner(e, owner_of_seq)] += e.cpu_time_total / 1e6
        total = next(e.cpu_time_total for e in events if e.name == "step::fwd_bwd") / 1e6
        out["other"] += total - sum(out[c] for c in COMPONENTS)
    return {**{c: out.get(c, 0.0) for c in COMPONENTS}, "total": total,
            **{PRODUCTS + c: out.get(PRODUCTS + c, 0.0) for c in COMPONENTS if device.type != "cuda"}}
