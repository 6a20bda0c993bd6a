"""The built-in training recipes, shipped inside the package (so they exist in an installed wheel).

A recipe is named by its file name without ``.yaml`` (``k400_vitb16_inti``) or given as a path;
``inti-train --config k400_vitb16_inti`` and ``--config path/to/my.yaml`` both work, and
``inti-train --list-recipes`` prints the names. ``base/`` holds the shared parts the recipes build
on and ``ds/`` the DeepSpeed JSON files; neither is a recipe of its own. ``launch/`` holds launch
scripts (``launch/slurm.sbatch``: multi-node torchrun under Slurm, with preemption and requeue),
which ``--list-recipes`` lists after the recipes with their paths. In a source checkout,
``recipes/`` at the top of the repository is a link to this folder.

    >>> recipe_path("digits_cpu").name
    'digits_cpu.yaml'
    >>> "k400_vitb16_inti" in list_recipes()
    True
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["LAUNCH_DIR", "RECIPES_DIR", "describe_recipes", "find_recipe", "list_launch_scripts", "list_recipes",
           "recipe_path"]

RECIPES_DIR = Path(__file__).resolve().parent
LAUNCH_DIR = RECIPES_DIR / "launch"
_RECIPE_END = r"[:.](?:\s|$)"  # a recipe's description ends at its first colon or full stop
_SENTENCE_END = r"[.](?:\s|$)"


def list_recipes() -> list[str]:
    """Names of the built-in recipes, sorted."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The file of the built-in recipe ``name`` (``"k400_vitb16_inti"`` or ``"k400_vitb16_inti.yaml"``)."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    path = RECIPES_DIR / f"{stem}.yaml"
    if "/" in stem or os.sep in stem or not path.is_file():
        raise FileNotFoundError(f"no built-in recipe {name!r}; the built-in recipes are: {', '.join(list_recipes())}")
    return path


def find_recipe(path_or_name: str | os.PathLike) -> Path:
    """A recipe file: ``path_or_name`` when that file exists, else the built-in recipe of that name.

    Raises:
        FileNotFoundError: Neither a file nor a built-in name; the message lists the names.
    """
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    try:
        return recipe_path(str(path_or_name))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"recipe not found: {str(path_or_name)!r} is neither a file nor a built-in recipe name "
            f"({', '.join(list_recipes())}; see inti-train --list-recipes)"
        ) from None


def list_launch_scripts() -> list[Path]:
    """The shipped launch scripts (``launch/slurm.sbatch``), sorted."""
    return sorted(p for p in LAUNCH_DIR.glob("*.sbatch") if p.is_file())


def _about(path: Path, pattern: str) -> str:
    """The first sentence (up to ``pattern``) of the comment that opens ``path`` (a shebang line is skipped)."""
    comment = []
    for line in path.read_text().splitlines():
        if line.startswith("#!") and not comment:
            continue
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    return re.split(pattern, " ".join(comment), maxsplit=1)[0]


def describe_recipes() -> str:
    """One line per built-in recipe: its name and the first sentence of its leading comment; then the
    launch scripts, each with its path and what it is."""
    names = list_recipes()
    width = max(map(len, names))
    lines = [f"{name:<{width}}  {_about(RECIPES_DIR / f'{name}.yaml', _RECIPE_END)}".rstrip() for name in names]
    scripts = list_launch_scripts()
    if scripts:
        lines.append("launch scripts (copy, or submit as they are; see their first lines):")
        lines += [f"  {p}  {_about(p, _SENTENCE_END)}".rstrip() for p in scripts]
    return "\n".join(lines)
