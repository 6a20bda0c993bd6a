"""Recipes are package data and resolve by name; the wheel builds, installs and runs outside the repo."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from inti_adapters.recipes import RECIPES_DIR, describe_recipes, find_recipe, list_recipes, recipe_path
from inti_adapters.train import ConfigError, load_config
from inti_adapters.train.cli import train_main

ROOT = Path(__file__).resolve().parents[1]


def test_recipes_resolve_by_name_or_path(capsys):
    assert {"digits_cpu", "k400_vitb16_inti", "ssv2_vitl14_inti_temporal"} <= set(list_recipes())
    assert "base" not in list_recipes() and len(list_recipes()) == 13
    by_name = load_config("k400_vitb16_inti")
    assert by_name == load_config(RECIPES_DIR / "k400_vitb16_inti.yaml") == load_config("k400_vitb16_inti.yaml")
    assert Path(by_name.train.deepspeed_config).is_file()  # relative paths resolve inside the package
    assert (ROOT / "recipes" / "digits_cpu.yaml").resolve() == recipe_path("digits_cpu")  # the source-tree link
    assert find_recipe(ROOT / "recipes" / "digits_cpu.yaml").is_file()
    with pytest.raises(ConfigError, match=r"'k400_vitb16' is neither a file nor a built-in recipe name \(digits_cpu"):
        load_config("k400_vitb16")
    with pytest.raises(SystemExit) as done:
        train_main(["--list-recipes"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.strip() == describe_recipes()
    assert all(name in out for name in list_recipes()) and "Kinetics-400, ViT-B/16, naive adaptation" in out


def test_every_recipe_file_is_declared_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = patterns["inti_adapters.recipes"]
    files = [p.relative_to(RECIPES_DIR).as_posix() for p in RECIPES_DIR.rglob("*")
             if p.is_file() and p.suffix in (".yaml", ".json")]
    assert files and all(any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs) for f in files)


def _copy_sources(dst: Path) -> None:
    """What the build needs, so that build/ and *.egg-info land in tmp, never in the repository."""
    import shutil

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "inti_adapters", dst / "inti_adapters", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, dst / name)


def _run(args: list, cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_wheel_builds_installs_and_runs_outside_the_source_tree(tmp_path):
    pytest.importorskip("build")
    _copy_sources(tmp_path / "src")
    # sdist first, then the wheel from the sdist: both must carry the recipes
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp_path / "dist", tmp_path / "src"], tmp_path)
    wheel, = (tmp_path / "dist").glob("*.whl")
    sdist, = (tmp_path / "dist").glob("*.tar.gz")
    shipped = zipfile.ZipFile(wheel).namelist()
    for f in ("recipes/__init__.py", "recipes/digits_cpu.yaml", "recipes/base/k400.yaml", "recipes/ds/zero3.json"):
        assert f"inti_adapters/{f}" in shipped
        assert any(n.endswith(f"inti_adapters/{f}") for n in tarfile.open(sdist).getnames())
    assert "inti-export = inti_adapters.train.export_cli:export_main" in zipfile.ZipFile(wheel).read(
        next(n for n in shipped if n.endswith("entry_points.txt"))).decode()

    # a fresh venv that sees the dev environment's packages (torch, timm, ...) but not our sources
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    py = venv / "bin" / "python"
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip()
    dev_site = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "dev_environment.pth").write_text("\n".join(dev_site) + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--quiet", "--no-deps", "--no-index", wheel], tmp_path)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert "usage: inti-demo" in _run([venv / "bin" / "inti-demo", "--help"], outside, env)  # argparse's prog
    assert "usage: inti-export" in _run([venv / "bin" / "inti-export", "--help"], outside, env)
    listed = _run([venv / "bin" / "inti-train", "--list-recipes"], outside, env)
    assert all(name in listed for name in list_recipes())
    code = ("import inti_adapters as ia, inti_adapters.demo as demo\n"
            "from inti_adapters.train import load_config\n"
            "print(ia.__file__); print(demo.RECIPE)\n"
            "print(load_config('k400_vitb16_inti').train.deepspeed_config)\n")
    files = _run([py, "-c", code], outside, env).split()
    assert all(Path(f).resolve().is_relative_to(venv.resolve()) for f in files), files  # the installed copy
    assert Path(files[-1]).is_file()
