"""Shared helpers of the benchmark scripts: timing, machine description, tables and result files.

Every script in ``benchmarks/`` prints a table and writes ``benchmarks/results/<name>.md`` that
starts with the machine, the versions and the command that produced it (see :func:`write_results`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from inti_adapters.surgery import probe

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


# -- timing ---------------------------------------------------------------------------------------
def synchronize(device: str | torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: str | torch.device = "cpu",
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds one call of ``fn`` takes, with the device synchronised before and after.

    ``clock=time.thread_time`` counts this thread's CPU time instead of wall time (CPU work only).
    """
    synchronize(device)
    start = clock()
    fn()
    synchronize(device)
    return clock() - start


def interleaved_timings(
    fns: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Time every function ``repeats`` times, round-robin over the functions for each repeat.

    Interleaving spreads slow drifts of the machine (other processes, clocks, caches) over all
    variants instead of charging them to whichever ran last. Each round starts at a different
    function, so none always follows the same one. ``warmup`` untimed rounds come first.
    ``clock`` as in :func:`time_once`.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(fns)
    for w in range(warmup):
        for name in names:
            if progress:
                progress(f"warm-up {w + 1}/{warmup}: {name}")
            fns[name]()
            synchronize(device)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            out[name].append(time_once(fns[name], device, clock))
        if progress:
            progress(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {out[n][-1]:.3f}s" for n in names))
    return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """Relative spread ``(max - min) / median`` of repeated timings."""
    m = median(values)
    return (max(values) - min(values)) / m if m else 0.0


# -- memory and profiles ----------------------------------------------------------------------------
def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared storages count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


class SavedTensorBytes:
    """Context manager: bytes of the distinct storages autograd saves for backward inside it.

    Storages of ``exclude`` (e.g. the parameters) are not counted. ``within_total`` is the part
    first saved while one of the ``within`` modules was running (forward hooks around them).

        >>> meter = SavedTensorBytes(exclude=model.parameters())   # doctest: +SKIP
        >>> with meter:
        ...     loss = model(x).sum()
        >>> meter.total                                            # activation bytes held for backward
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), within: Iterable[torch.nn.Module] = ()) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._within = list(within)
        self._saved: dict[int, int] = {}
        self._inside: set[int] = set()
        self._depth = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(RuntimeError, NotImplementedError):  # tensors without a storage
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr and ptr not in self._exclude:
                if ptr not in self._saved and self._depth:
                    self._inside.add(ptr)
                self._saved[ptr] = max(self._saved.get(ptr, 0), st.nbytes())
        return t

    def _enter_module(self, *_: Any) -> None:
        self._depth += 1

    def _leave_module(self, *_: Any) -> None:
        self._depth -= 1

    def __enter__(self) -> SavedTensorBytes:
        self._probe = probe(self._within, before=self._enter_module, after=self._leave_module)
        self._probe.__enter__()
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        self._probe.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self._saved.values())

    @property
    def within_total(self) -> int:
        return sum(self._saved[p] for p in self._inside)


def cuda_peak_bytes(fn: Callable[[], Any], own_bytes: float, device: str | torch.device) -> float:
    """Peak allocated bytes during ``fn`` minus what was allocated before it apart from ``own_bytes``.

    With several models on one GPU, pass the bytes the measured model already holds (weights,
    gradients, optimizer state) as ``own_bytes``: the result is that model's own peak.
    """
    synchronize(device)
    others = torch.cuda.memory_allocated(device) - own_bytes
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - others)


def module_seconds(modules: Sequence[torch.nn.Module], fn: Callable[[], Any], device: str | torch.device,
                   calls: int = 2) -> float:
    """Median seconds per call of ``fn`` spent inside the forward of ``modules`` (synchronised hooks)."""
    spent = [0.0]
    starts: dict[int, float] = {}

    def pre(m: torch.nn.Module, args: Any, kwargs: Any) -> None:
        synchronize(device)
        starts[id(m)] = time.perf_counter()

    def post(m: torch.nn.Module, out: Any) -> None:
        synchronize(device)
        spent[0] += time.perf_counter() - starts.pop(id(m))

    per_call = []
    with probe(modules, before=pre, after=post):
        for _ in range(calls):
            spent[0] = 0.0
            fn()
            per_call.append(spent[0])
    return median(per_call)


def profile_table(fn: Callable[[], Any], device: str | torch.device, rows: int = 12, *, memory: bool = False) -> str:
    """torch.profiler table of one call of ``fn``: top ops by self time, or with ``memory`` by the
    memory they allocate themselves (CUDA time / memory on a CUDA device)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, profile_memory=memory) as prof:
        fn()
        synchronize(device)
    where = "device" if cuda else "cpu"
    key = f"self_{where}_memory_usage" if memory else f"self_{where}_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48)


# -- machine and versions -------------------------------------------------------------------------
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
        return out + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_average() -> str:
    with contextlib.suppress(OSError, AttributeError):
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    return "n/a"


def machine_info(device: str | torch.device = "cpu", packages: Sequence[str] = ()) -> dict[str, str]:
    """What produced a result: hardware, software versions, threads and load."""
    import inti_adapters

    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "cpu": f"{_cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        "load average (1/5/15 min) at start": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "inti_adapters": f"{inti_adapters.__version__} (git {_git_commit()})",
    }
    for pkg in ("timm", *packages):
        info[pkg] = _version(pkg)
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return info


def command_line() -> str:
    """The command that is running, as one copy-pasteable line."""
    argv = [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]
    with contextlib.suppress(ValueError):
        argv[0] = Path(sys.argv[0]).resolve().relative_to(REPO_ROOT).as_posix()
    return "python " + " ".join(shlex.quote(a) for a in argv)


# -- tables and files -----------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` has one of ``l``/``r`` per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} entries for {len(headers)} columns")
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) if a == "l" else v.rjust(w)
                                 for v, w, a in zip(values, widths, align, strict=True)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else (":" + "-" * (w + 1))
                          for w, a in zip(widths, align, strict=True)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def write_results(
    name: str,
    title: str,
    sections: Sequence[tuple[str, str]],
    *,
    info: dict[str, str],
    command: str | None = None,
    results_dir: str | Path | None = None,
) -> Path:
    """Write ``results/<name>.md``: title, command, machine and versions, then ``(heading, body)`` sections."""
    out_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {**info, "load average (1/5/15 min) at end": load_average()}
    parts = [f"# {title}", "", "Produced by:", "", "```", command or command_line(), "```", "",
             "## Machine and versions", ""]
    parts += [f"- **{k}**: {v}" for k, v in info.items()]
    for heading, body in sections:
        parts += ["", f"## {heading}", "", body.rstrip()]
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def log(message: str) -> None:
    """Progress line on stderr (the table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Temporarily set ``torch.set_num_threads``."""
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
