"""The built-in training recipes, shipped inside the package (so they exist in an installed wheel).

A recipe is named by its file name without ``.yaml`` (``k400_vitb16_inti``) or given as a path;
``inti-train --config k400_vitb16_inti`` and ``--config path/to/my.yaml`` both work, and
``inti-train --list-recipes`` prints the names. ``base/`` holds the shared parts the recipes build
on and ``ds/`` the DeepSpeed JSON files; neither is a recipe of its own. In a source checkout,
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

__all__ = ["RECIPES_DIR", "describe_recipes", "find_recipe", "list_recipes", "recipe_path"]

RECIPES_DIR = Path(__file__).resolve().parent


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


def describe_recipes() -> str:
    """One line per built-in recipe: its name and the first sentence of its leading comment."""
    names = list_recipes()
    width = max(map(len, names))
    lines = []
    for name in names:
        comment = []
        for line in (RECIPES_DIR / f"{name}.yaml").read_text().splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        about = re.split(r"[:.](?:\s|$)", " ".join(comment), maxsplit=1)[0]
        lines.append(f"{name:<{width}}  {about}".rstrip())
    return "\n".join(lines)
