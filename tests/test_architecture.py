"""The architecture holds: imports point one way, one module does the surgery, files stay small.

These read the source (AST), so they fail the moment a change breaks a rule, not when it bites.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "inti_adapters"
SURGERY = PKG / "surgery.py"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute names of the package's modules an ``from ... import ...`` statement loads."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("inti_adapters"):
        return []
    return [target] + [f"{target}.{a.name}" for a in node.names]


def _imports(module: str, path: Path) -> tuple[set[str], list[str]]:
    """(package modules imported at module level, function-level imports of package modules)."""
    tree = ast.parse(path.read_text())
    known = set(_modules())
    top, nested = set(), []
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names: list[str] = []
            if isinstance(child, ast.ImportFrom):
                names = _resolve(module, is_package, child)
            elif isinstance(child, ast.Import):
                names = [a.name for a in child.names if a.name.startswith("inti_adapters")]
            names = [n for n in names if n in known]
            if names and in_function:
                nested.append(f"{module}:{child.lineno}")
            elif names and not (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)):
                top.update(names)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, nested


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it needs at import time (a submodule also needs its packages)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps, _ = _imports(name, path)
        for d in list(deps):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            parts = d.split(".")
            deps.update(".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i]) in modules)
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {d for d in deps if d != name and d not in ancestors}  # a package runs before its modules
    return graph


def test_imports_form_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                dfs(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            dfs(name)


def test_core_does_not_import_the_layers_above_it():
    graph = _graph()
    layers = [  # each may import only from itself and the groups before it
        {"inti_adapters._version", "inti_adapters.errors", "inti_adapters._registry", "inti_adapters._config",
         "inti_adapters._io", "inti_adapters.tokens", "inti_adapters._peft", "inti_adapters._format"},
        {"inti_adapters.context", "inti_adapters.config", "inti_adapters.flops", "inti_adapters.video"},
        {m for m in graph if m.startswith("inti_adapters.hosts")},
        {"inti_adapters.surgery"},
    ]
    allowed: set[str] = set()
    for group in layers:
        allowed |= group
        for m in group:
            above = sorted(d for d in graph[m] if d not in allowed)
            assert not above, f"{m} imports {above}, which sit above it"


def test_no_function_level_imports_of_package_modules():
    nested = [n for name, path in _modules().items() for n in _imports(name, path)[1]]
    assert not nested, f"imports of inti_adapters modules inside functions: {nested}"


def test_every_module_imports_in_a_fresh_interpreter():
    # one interpreter, third-party packages warm; each module of ours imported from scratch
    code = (
        "import importlib, sys, timm, torch\n"
        f"names = {sorted(m for m in _modules() if not m.endswith('__main__'))!r}\n"
        "bad = []\n"
        "for name in names:\n"
        "    for m in [m for m in sys.modules if m == 'inti_adapters' or m.startswith('inti_adapters.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def _hook_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr.startswith(("register_forward", "register_full_backward", "register_module_forward")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.attr}")
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Attribute) and t.attr == "forward":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} .forward =")
    return found


def test_only_the_surgery_module_changes_forwards():
    outside = [c for p in PKG.rglob("*.py") if p != SURGERY for c in _hook_calls(p)]
    outside += [c for p in (ROOT / "benchmarks").glob("*.py") for c in _hook_calls(p)]
    assert not outside, f"hooks or forward overrides outside inti_adapters/surgery.py: {outside}"
    assert _hook_calls(SURGERY), "the surgery module is expected to install the overrides"


@pytest.mark.parametrize("folder", ["inti_adapters", "benchmarks"])
def test_functions_and_modules_stay_small(folder):
    long_functions, long_modules = [], []
    for path in sorted((ROOT / folder).rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                n = node.end_lineno - first + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"
