"""The README's "Share on the Hub" and "Export" snippets run as written (tiny models, a mocked Hub)."""

from __future__ import annotations

import re
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
