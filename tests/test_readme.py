"""Every README python snippet runs on its own and prints what the README shows (the "Share on the Hub" and
"Export" ones with a small ViT of ViT-B's input size and a mocked Hub)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch
from test_hub import FakeHub

import inti_adapters as ia

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def snippet(section: str) -> str:
    """The python code blocks of a README section (``## <section>`` up to the next ``## ``)."""
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, f"no python block in README section {section!r}"
    return "\n".join(blocks)


def _tiny_vits(monkeypatch):
    """``timm.create_model`` as the README calls it, building a small ViT of the same input size (224 px,
    depth 7 for layers=[4, 6]), so that a snippet written for ViT-B/16 runs as written in seconds."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    def create_model(name, pretrained=False, num_classes=1000, **kwargs):
        assert name == "vit_base_patch16_clip_224" and not pretrained
        return VisionTransformer(img_size=224, patch_size=56, embed_dim=16, depth=7, num_heads=2,
                                 num_classes=num_classes)

    monkeypatch.setattr(timm, "create_model", create_model)


def _run(section: str) -> tuple[dict, list[str]]:
    """Run a README section's python blocks on their own (a fresh namespace); what they print, and what
    the README shows after them."""
    (code, shown), = [(c, s) for h, c, s in BLOCKS if h == section]
    names = {"__name__": "readme_snippet"}
    torch.manual_seed(0)
    exec(compile(code, f"README.md ({section})", "exec"), names)
    return names, shown


def test_share_on_the_hub_snippet_runs_on_its_own(tmp_path, monkeypatch):
    hf = pytest.importorskip("huggingface_hub")
    pytest.importorskip("peft")
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(hf.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf.constants, "HF_HUB_CACHE", str(cache))
    hub = FakeHub(cache)
    monkeypatch.setattr(hf, "HfApi", hub.api)
    monkeypatch.chdir(tmp_path)
    _tiny_vits(monkeypatch)
    names, _ = _run("Share on the Hub")
    assert "16×4×3" in (tmp_path / "out" / "README.md").read_text()
    assert sorted(hub.uploaded) == ["your-org/inti-vitb16-k400", "your-org/inti-vitb16-k400-lora"]
    assert "peft/adapter_model.safetensors" in hub.uploaded["your-org/inti-vitb16-k400-lora"]
    loaded = names["model"]  # loaded back by id into a fresh backbone: equal to the saved folder
    assert isinstance(loaded, ia.InTIModel)
    import timm

    from_folder = ia.load_pretrained(timm.create_model("vit_base_patch16_clip_224", num_classes=400), "out/")
    video = torch.randn(1, 3, 4, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(video), from_folder(video), rtol=0, atol=0)


@pytest.mark.slow
def test_export_snippet_runs_on_its_own_and_prints_what_the_readme_shows(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    _tiny_vits(monkeypatch)
    names, shown = _run("Export")
    assert capsys.readouterr().out.splitlines() == shown
    model, video = names["model"], names["video"]
    with torch.no_grad():
        torch.testing.assert_close(names["logits"], model(video[:1]), rtol=1e-5, atol=1e-5)
    assert isinstance(torch.export.load("model.pt2"), torch.export.ExportedProgram)
    assert ia.export.onnx_difference("model.onnx", model, video[:1]) < 1e-5  # batch 1: not the example's 2


# -- issue 24: every python snippet runs on its own and prints what the readme shows -------------------------
STAND_INS = ("Share on the Hub", "Export")  # run above with a small ViT of ViT-B's input (and a mocked Hub)


def python_blocks() -> list[tuple[str, str, list[str] | None]]:
    """(heading, code, printed lines the README shows in a ```text block right after it, or None);
    blocks indented inside a list item are dedented."""
    found, heading = [], ""
    pattern = r"^(#{2,3}) ([^\n]+)$|^( *)```python\n(.*?)^\3```\n(?:\3```text\n(.*?)^\3```\n)?"
    for m in re.finditer(pattern, README, flags=re.S | re.M):
        if m.group(2):
            heading = m.group(2).strip()
        else:
            shown = textwrap.dedent(m.group(5)).splitlines() if m.group(5) is not None else None
            found.append((heading, textwrap.dedent(m.group(4)), shown))
    return found


BLOCKS = python_blocks()


@pytest.mark.slow
@pytest.mark.parametrize("heading, code, shown", [b for b in BLOCKS if b[0] not in STAND_INS],
                         ids=[f"{i}-{b[0]}" for i, b in enumerate(BLOCKS) if b[0] not in STAND_INS])
def test_every_snippet_runs_on_its_own_and_prints_what_the_readme_shows(heading, code, shown, tmp_path, monkeypatch,
                                                                         capsys):
    from inti_adapters.hosts import _base as hosts

    pytest.importorskip("peft")
    pytest.importorskip("open_clip")
    monkeypatch.chdir(tmp_path)
    registered = dict(hosts._HOSTS)  # "Supporting a new host" registers one: the other tests must not see it
    torch.manual_seed(0)
    try:
        exec(compile(code, f"README.md ({heading})", "exec"), {"__name__": "readme_snippet"})  # a fresh namespace
    finally:
        hosts._HOSTS.clear()
        hosts._HOSTS.update(registered)
    printed = capsys.readouterr().out.splitlines()
    if shown is not None:
        assert printed == shown


def test_the_readme_shows_the_output_of_its_printing_snippets():
    printing = [b for b in BLOCKS if "print(" in b[1]]
    assert printing and all(shown for _, _, shown in printing), [h for h, _, shown in printing if not shown]


def test_the_smoke_evaluation_line_the_readme_shows_is_what_a_run_prints(capsys):
    """issue 24 item 9: smoke runs are seeded, so the printed figures repeat (and match the README)."""
    from inti_adapters.train.cli import eval_main

    shown = re.search(r"The line `inti-eval --config k400_vitb16_inti --smoke`.*?```\n\s*(inti-eval: [^\n]+)\n",
                      README, flags=re.S).group(1)
    printed = []
    for recipe in ("k400_vitb16_inti", "digits_cpu", "digits_cpu"):
        assert eval_main(["--config", recipe, "--smoke"]) == 0
        printed.append([line for line in capsys.readouterr().out.splitlines() if line.startswith("inti-eval:")][-1])
    assert printed[0] == shown
    assert printed[1] == printed[2]  # the digits smoke: the same top-1 on every run


def test_demo_help_and_readme_agree_on_what_the_naive_model_learns():
    from inti_adapters import demo

    assert "direction and axis stay at chance" in README
    assert "accuracies stay at chance" in demo.__doc__ and "can tell the axis" not in demo.__doc__


@pytest.mark.parametrize("function", [ia.inject, ia.plan, ia.load_pretrained, ia.save_pretrained, ia.add_lora])
def test_public_docstrings_name_every_parameter_and_what_they_return(function):
    import inspect

    doc = inspect.getdoc(function)
    params = [p for p in inspect.signature(function).parameters if p not in ("kwargs", "hub_options")]
    args = doc.split("Args:", 1)[1] if "Args:" in doc else doc
    missing = [p for p in params if not re.search(rf"(^|\W){p}\b", args)]
    assert not missing, f"{function.__name__}'s docstring does not describe {missing}"
    assert "Returns" in doc or "returns" in doc, f"{function.__name__}'s docstring says nothing of what it returns"
