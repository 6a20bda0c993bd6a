"""The README's "Share on the Hub" and "Export" snippets run as written (tiny models, a mocked Hub)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import IMG, make_vit
from test_hub import FakeHub

import inti_adapters as ia

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def snippet(section: str) -> str:
    """The python code blocks of a README section (``## <section>`` up to the next ``## ``)."""
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, f"no python block in README section {section!r}"
    return "\n".join(blocks)


def test_share_on_the_hub_snippet(tmp_path, monkeypatch):
    hf = pytest.importorskip("huggingface_hub")
    peft = pytest.importorskip("peft")
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(hf.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf.constants, "HF_HUB_CACHE", str(cache))
    hub = FakeHub(cache)
    monkeypatch.setattr(hf, "HfApi", hub.api)
    monkeypatch.chdir(tmp_path)
    model = ia.inject(make_vit(), layers=[1])
    peft_model = ia.add_lora(ia.inject(make_vit(), layers=[1]), peft.LoraConfig(r=2, target_modules=["qkv"]))
    names = {"ia": ia, "torch": torch, "model": model, "peft_model": peft_model, "backbone": make_vit()}
    exec(snippet("Share on the Hub"), names)
    assert "16×4×3" in (tmp_path / "out" / "README.md").read_text()
    assert sorted(hub.uploaded) == ["your-org/inti-vitb16-k400", "your-org/inti-vitb16-k400-lora"]
    assert "peft/adapter_model.safetensors" in hub.uploaded["your-org/inti-vitb16-k400-lora"]
    assert isinstance(names["model"], ia.InTIModel) and names["model"] is not model  # loaded back by id
    video = torch.randn(1, 3, 4, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(names["model"](video), model(video), rtol=0, atol=0)


@pytest.mark.slow
def test_export_snippet(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from test_export import _perturb, _vit

    monkeypatch.chdir(tmp_path)
    model = _perturb(ia.inject(_vit(), layers=[0]))
    video = torch.randn(3, 3, 4, 16, 16)
    names = {"ia": ia, "torch": torch, "model": model, "video": video}
    exec(snippet("Export"), names)
    with torch.no_grad():
        torch.testing.assert_close(names["logits"], model(video), rtol=1e-5, atol=1e-5)
    assert torch.export.load("model.pt2") is not None
    assert ia.export.onnx_difference("model.onnx", model, video) < 1e-5  # batch 3: not the example's 2


# -- issue 24: every python snippet runs on its own and prints what the README shows -------------------------
CONTINUED = ("Share on the Hub", "Export")  # continue from the Quickstart's `model` / `video`: tested above on stand-ins


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
@pytest.mark.parametrize("heading, code, shown", [b for b in BLOCKS if b[0] not in CONTINUED],
                         ids=[f"{i}-{b[0]}" for i, b in enumerate(BLOCKS) if b[0] not in CONTINUED])
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
    printing = [b for b in BLOCKS if "print(" in b[1] and b[0] not in CONTINUED]
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
