"""What the parts of the GPU suite (``gpu_suite.py``) share: settings, the time budget, the
results file that is rewritten after every part, and facts about the device (peak FLOP/s).

Nothing here measures anything; see ``_gpu_throughput.py``, ``_gpu_engine.py`` and
``_gpu_data.py`` for the parts.
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import log, write_results

GIB = 2**30

# Dense (no structured sparsity) bf16 Tensor Core peaks in TFLOP/s, from NVIDIA's data sheets, whose
# headline bf16 figures are "with sparsity" (twice the dense rate): H100 SXM5 1,979 / PCIe 1,513 /
# NVL 1,671 (H100 Tensor Core GPU data sheet); H200 SXM 1,979 / NVL 1,671 (H200 data sheet); GH200
# 1,979 (GH200 data sheet); A100 312 dense (A100 data sheet, 624 with sparsity); L4 242 with
# sparsity (L4 data sheet). Order matters: the first pattern that matches the device name wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    (r"GH200", 989.4, "GH200 (Hopper GPU), 1,979 sparse / 2"),
    (r"H200\s*NVL", 835.5, "H200 NVL, 1,671 sparse / 2"),
    (r"H200", 989.4, "H200 SXM, 1,979 sparse / 2"),
    (r"H100\s*NVL", 835.5, "H100 NVL, 1,671 sparse / 2"),
    (r"H100.*PCIE", 756.5, "H100 PCIe, 1,513 sparse / 2"),
    (r"H100", 989.4, "H100 SXM5, 1,979 sparse / 2"),
    (r"A100", 312.0, "A100 (SXM and PCIe), dense"),
    (r"\bL4\b", 121.0, "L4, 242 sparse / 2"),
)


def peak_bf16_tflops(device_name: str) -> tuple[float | None, str]:
    """``(dense bf16 TFLOP/s, where the figure comes from)`` for a device name; ``(None, why)`` if unknown."""
    for pattern, tflops, source in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name.upper()):
            return tflops, source
    return None, f"n/a (unknown peak for {device_name!r}; pass --peak-tflops)"


def device_slug(name: str) -> str:
    """``'NVIDIA H200'`` -> ``'nvidia_h200'`` (for the results file name)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "device"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def device_facts(device: torch.device) -> dict[str, str]:
    """Driver, CUDA, cuDNN, NCCL, compute capability: what ``machine_info`` does not say."""
    if device.type != "cuda":
        return {"accelerator": "none: CPU run (smoke), figures are not GPU figures"}
    props = torch.cuda.get_device_properties(device)
    facts = {"gpu detail": f"{props.name}, compute capability {props.major}.{props.minor}, "
                           f"{props.multi_processor_count} SMs, {props.total_memory / GIB:.1f} GiB",
             "cuda (torch build)": str(torch.version.cuda),
             "cudnn": str(torch.backends.cudnn.version())}
    with contextlib.suppress(Exception):
        nccl = torch.cuda.nccl.version()  # a tuple in recent torch, an int in old ones
        facts["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    facts["driver"] = nvidia_driver()
    return facts


def nvidia_driver() -> str:
    """The driver version from ``nvidia-smi`` (torch does not report it)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "unknown (no nvidia-smi on PATH)"
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.strip().splitlines()
        return out[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({type(e).__name__})"


def free_device_memory(device: torch.device) -> None:
    """Collect garbage and return cached blocks, so the next model starts from an empty device."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# -- settings -------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Everything a run measures and how long it may take (built by ``gpu_suite.parse_args``)."""

    device: torch.device
    smoke: bool
    out_dir: Path
    results_name: str
    budget_s: float
    backbone: str
    model_kwargs: dict[str, Any]
    num_classes: int
    frames: int
    size: int
    layers: tuple[int, ...]
    tome_layers: tuple[int, ...]
    temporal: tuple[dict[str, Any], ...]
    dtype: str  # "bf16" or "fp32"
    warmup: int
    repeats: int
    max_batch: int
    memory_cap: float  # fraction of device memory a batch may peak at
    step_cap_s: float  # a batch-search step slower than this stops the search
    compile: bool
    compile_backend: str
    compile_cap_s: float  # most seconds one compiled variant may take (compile + timing)
    compile_items: tuple[tuple[str, str], ...]  # (variant, mode) pairs to compile, in priority order
    threads: int | None  # torch.set_num_threads for this process (None: torch's default)
    peak_tflops: float | None
    parts: tuple[str, ...]
    engine: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    work_dir: Path | None = None  # scratch space of parts 3 and 4 (default: a temporary directory)


# -- time budget ----------------------------------------------------------------------------------
class PartTimeout(Exception):
    """Raised inside a part (by :func:`hard_deadline`) when its time is up."""


class Budget:
    """The run's seconds split into cumulative deadlines, one per stage.

    ``ends`` maps a stage to the fraction of the total by which it must be done; time a stage
    leaves unused goes to the next ones. Every stage checks :meth:`left` between measurements
    (soft stop) and runs under :func:`hard_deadline` (hard stop) as a guard.
    """

    def __init__(self, total_s: float, ends: dict[str, float]) -> None:
        if total_s <= 0:
            raise ValueError(f"the budget must be > 0 s, got {total_s}")
        if list(ends.values()) != sorted(ends.values()) or not all(0 < f <= 1 for f in ends.values()):
            raise ValueError(f"stage ends must be increasing fractions in (0, 1], got {ends}")
        self.total_s = total_s
        self.ends = dict(ends)
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def deadline(self, stage: str) -> float:
        """``time.perf_counter()`` value by which ``stage`` must be done."""
        return self.start + self.ends[stage] * self.total_s

    def left(self, stage: str) -> float:
        return self.deadline(stage) - time.perf_counter()


def seconds_left(deadline: float) -> float:
    return deadline - time.perf_counter()


def _raise_timeout(signum: int, frame: Any) -> None:
    raise PartTimeout("hard time limit reached")


@contextlib.contextmanager
def hard_deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`PartTimeout` in this (main) thread after ``seconds`` (SIGALRM).

    Interrupts long Python work such as a ``torch.compile`` in progress; a no-op outside the main
    thread or where SIGALRM does not exist. Not nestable: the inner one replaces the outer one.
    """
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return
    if seconds <= 0:
        raise PartTimeout("no time left")
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- results --------------------------------------------------------------------------------------
@dataclass
class PartResult:
    """One part's outcome: ``status`` is measured, partial, skipped or error; ``body`` is markdown."""

    key: str
    status: str
    body: str = ""
    reason: str = ""
    trace: str = ""
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = [f"Status: **{self.status}** ({self.seconds:.0f} s)" + (f": {self.reason}" if self.reason else "")]
        if self.body:
            lines += ["", self.body.rstrip()]
        if self.trace:
            lines += ["", "```", self.trace.rstrip(), "```"]
        return "\n".join(lines)


class Report:
    """The results file, rewritten in full after every part (a killed run still leaves one)."""

    def __init__(self, settings: Settings, title: str, info: dict[str, str], parts: Sequence[tuple[str, str]],
                 setup: str) -> None:
        self.settings = settings
        self.title = title
        self.info = info
        self.headings = dict(parts)
        self.setup = setup
        self.results: dict[str, PartResult] = {}

    def set(self, result: PartResult) -> None:
        self.results[result.key] = result

    def write(self, status: str) -> Path:
        """Rewrite the whole file: status, setup, every part (or 'not run'), notes."""
        sections = [("Status", status), ("Setup", self.setup)]
        for key, heading in self.headings.items():
            res = self.results.get(key)
            sections.append((heading, res.markdown() if res else "_not run (yet)_"))
        sections.append(("Notes", "\n".join(f"- {n}" for n in self.settings.notes) or "- none"))
        path = write_results(self.settings.results_name, self.title, sections, info=self.info,
                             results_dir=self.settings.out_dir)
        log(f"wrote {path} ({status})")
        return path


def fmt(value: float | None, spec: str = ".1f", missing: str = "n/a") -> str:
    """Format a number, or ``missing`` for None / NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)
