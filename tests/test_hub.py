"""Sharing on the Hub, offline: the model card, loading by Hub id from a cache filled by hand with
``HF_HUB_OFFLINE=1``, and ``push_to_hub`` against a mocked ``HfApi`` that records what it uploads."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import IMG, make_vit

import inti_adapters as ia
from inti_adapters import card as card_module
from inti_adapters._config import ConfigError
from inti_adapters.hub import ADAPTER_PATTERNS, is_hub_id, resolve_adapter

hf = pytest.importorskip("huggingface_hub")
VIDEO = torch.randn(2, 3, 4, IMG, IMG, generator=torch.Generator().manual_seed(0))


def _trained(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every added weight away from its initial value, so that adapters differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "backbone.blocks" not in name.replace("base_model.model.", ""):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _lora_model(seed: int) -> torch.nn.Module:
    peft = pytest.importorskip("peft")
    model = ia.add_lora(ia.inject(make_vit(), layers=[1], freeze_backbone=True,
                                  temporal=[{"name": "local_mhra", "blocks": [2]}]),
                        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["qkv"]))
    return _trained(model, seed)


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(VIDEO)


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


# -- the model card ----------------------------------------------------------------------------
def test_card_states_the_model_and_parses_as_hub_metadata(tmp_path):
    model = _trained(ia.inject(make_vit(), layers=[1, 2], temporal=[{"name": "local_mhra", "blocks": "all"}]), 1)
    model.save_pretrained(tmp_path, card={"num_frames": 4, "metrics": {"top1": 51.25, "mean_class_accuracy": 48.5},
                                          "views": "4×2×3", "dataset": "digits", "license": "apache-2.0"})
    text = (tmp_path / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["library_name"] == "inti_adapters" and meta["pipeline_tag"] == "video-classification"
    assert {"inti_adapters", "video-classification", "timm", "inti", "local_mhra"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["digits"]
    assert "base_model" not in meta  # a VisionTransformer built by hand names no pretrained weights
    parsed = hf.ModelCard.load(tmp_path / "README.md")  # what the Hub reads
    assert parsed.data.library_name == "inti_adapters" and "inti" in parsed.data.tags
    gflops = ia.count_gflops(model, torch.zeros(1, 3, 4, IMG, IMG))
    assert f"**{gflops:.2f} GFLOPs per view** of 4 frames at {IMG}×{IMG}" in text
    assert "blocks 0–1: 4, block 2: 2, block 3: 1" in text  # the frame schedule
    added = sum(p.numel() for p in model.compressors.parameters())
    assert f"| compressors | {added:,} | {added:,} |" in text
    total = sum(p.numel() for p in model.parameters())
    assert f"| **total** | {total:,} | {total:,} |" in text
    assert "`[1, 2]`: compressor on the output of `blocks[1]`, `blocks[2]`" in text
    assert "| top1 | 51.25 |" in text and "4×2×3" in text and "frames×clips×crops" in text
    assert 'ia.load_pretrained(backbone, "path/to/this/folder")' in text


def test_card_of_a_timm_model_names_its_base_model_and_lora():
    peft = pytest.importorskip("peft")
    import timm

    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_clip_224.openai", pretrained=False, num_classes=400)
    model = ia.add_lora(ia.inject(vit, layers=[4, 6]), peft.LoraConfig(r=8, target_modules=["qkv"]))
    text = card_module.render_card(model.get_base_model(), {"num_frames": 16}, peft_model=model,
                                   peft_order="after_inject")
    meta = _front_matter(text)
    assert meta["base_model"] == "timm/vit_base_patch16_clip_224.openai" and {"peft", "lora"} <= set(meta["tags"])
    assert "LORA `default` (r=8, lora_alpha=8) on `['qkv']`, applied after inject" in text
    gflops = float(re.search(r"\*\*([\d.]+) GFLOPs per view\*\* of 16 frames at 224×224", text).group(1))
    assert gflops == round(ia.count_gflops(model, torch.empty(1, 3, 16, 224, 224, device="meta")), 2)
    assert gflops == pytest.approx(179.0 + 0.54, abs=0.05)  # README's ViT-B/16 InTI [4, 6] + LoRA r=8 on qkv
    assert 'timm.create_model("vit_base_patch16_clip_224.openai", pretrained=True, num_classes=400)' in text


def test_card_options_checked_before_writing_and_user_readme_kept(tmp_path, monkeypatch):
    model = ia.inject(make_vit(), layers=[1])
    with pytest.raises(ConfigError, match="unknown option"):
        model.save_pretrained(tmp_path, card={"frames": 16})
    assert not any(tmp_path.iterdir())  # refused before any file was written
    # without num_frames nothing is counted: saving a large model stays fast
    monkeypatch.setattr(card_module, "count_gflops", lambda *a, **k: pytest.fail("counted without num_frames"))
    model.save_pretrained(tmp_path)
    assert "not counted" in (tmp_path / "README.md").read_text()
    (tmp_path / "README.md").write_text("# my own card\n")
    model.save_pretrained(tmp_path, card={"metrics": {"top1": 1.0}})
    assert (tmp_path / "README.md").read_text() == "# my own card\n"  # never overwritten
    shutil.rmtree(tmp_path)
    model.save_pretrained(tmp_path, card=False)
    assert not (tmp_path / "README.md").exists()


# -- loading by Hub id from a cache filled by hand -----------------------------------------------
def _publish(cache: Path, repo_id: str, folder: Path, revision: str = "main", files: list[str] | None = None) -> str:
    """Lay ``folder`` out as ``huggingface_hub``'s cache does: snapshots/<commit>/..., refs/<revision>."""
    files = files or sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join((folder / f).read_bytes() for f in files)).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for f in files:
        (repo / "snapshots" / commit / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / f, repo / "snapshots" / commit / f)
    (repo / "refs" / revision).parent.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """``HF_HUB_OFFLINE=1`` with an empty cache in tmp_path (no request can leave the process)."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf.constants, "HF_HUB_OFFLINE", True)  # read once, when huggingface_hub was imported
    monkeypatch.setattr(hf.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_load_by_hub_id_from_the_offline_cache_with_revisions_and_peft(tmp_path, offline):
    a, b = _lora_model(1), _lora_model(2)
    ia.save_pretrained(a, tmp_path / "a")
    ia.save_pretrained(b, tmp_path / "b")
    commit_a = _publish(offline, "org/inti-digits", tmp_path / "a")
    _publish(offline, "org/inti-digits", tmp_path / "b", revision="v2")
    for revision, ref in ((None, a), ("v2", b), (commit_a, a)):
        loaded = ia.load_pretrained(make_vit(), "org/inti-digits", revision=revision, is_trainable=False)
        assert ia.lora.is_peft_model(loaded)  # the peft/ part came along
        torch.testing.assert_close(_out(loaded), _out(ref), rtol=0, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="could not be fetched.*offline") as err:
        ia.load_pretrained(make_vit(), "org/unknown")
    assert err.value.__cause__ is not None  # huggingface_hub's own reason is chained
    with pytest.raises(FileNotFoundError, match="could not be fetched"):
        ia.load_pretrained(make_vit(), "org/inti-digits", revision="v3")


def test_hub_snapshot_is_validated_before_the_backbone_changes(tmp_path, offline):
    model = _trained(ia.inject(make_vit(), layers=[1]), 3)
    model.save_pretrained(tmp_path / "a")
    _publish(offline, "org/broken", tmp_path / "a", files=["README.md", "inti_config.json"])  # weights missing
    vit = make_vit()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        ia.load_pretrained(vit, "org/broken")
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    assert "forward" not in vit.blocks[1].__dict__  # no override left behind


def test_hub_options_reach_snapshot_download(tmp_path, monkeypatch):
    model = ia.inject(make_vit(), layers=[1])
    model.save_pretrained(tmp_path / "a")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path / "a")

    monkeypatch.setattr(hf, "snapshot_download", fake_snapshot_download)
    ia.load_pretrained(make_vit(), "org/name", revision="v1", token="hf_secret", cache_dir=tmp_path / "c",
                       local_files_only=True)
    (repo_id, kwargs), = calls
    assert repo_id == "org/name" and kwargs["revision"] == "v1" and kwargs["token"] == "hf_secret"
    assert kwargs["cache_dir"] == tmp_path / "c" and kwargs["local_files_only"] is True
    assert kwargs["allow_patterns"] == ADAPTER_PATTERNS and "peft/*" in ADAPTER_PATTERNS


def test_local_paths_win_and_hub_ids_are_recognised(tmp_path, monkeypatch):
    assert is_hub_id("org/name") and is_hub_id("my-org/inti.vit-b_16")
    for not_id in ("name", "./org/name", "/abs/path", "a/b/c", "org/../x", "~/x", "org/name.git", "org--a/b", 3):
        assert not is_hub_id(not_id)
    monkeypatch.chdir(tmp_path)
    ia.inject(make_vit(), layers=[1]).save_pretrained("org/name")  # a local folder shaped like a Hub id
    monkeypatch.setattr(hf, "snapshot_download", lambda *a, **k: pytest.fail("the Hub was asked for a local folder"))
    assert resolve_adapter("org/name") == Path("org/name")
    ia.load_pretrained(make_vit(), "org/name")
    with pytest.raises(ValueError, match="apply to Hub ids"):
        ia.load_pretrained(make_vit(), "org/name", revision="v2")
    with pytest.raises(FileNotFoundError, match="no inti_config.json"):  # a missing path: unchanged message
        ia.load_pretrained(make_vit(), tmp_path / "missing")


def test_without_huggingface_hub_a_hub_id_says_what_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)
    with pytest.raises(FileNotFoundError, match=r"inti-adapters\[hub\]"):
        ia.load_pretrained(make_vit(), "org/name")


# -- push_to_hub against a mocked HfApi ----------------------------------------------------------
class FakeHub:
    """Records every HfApi call; an upload is published into the offline cache, as the Hub would serve it."""

    def __init__(self, cache: Path) -> None:
        self.cache, self.calls, self.uploaded = cache, [], {}

    def api(self, **kwargs):
        self.calls.append(("HfApi", {k: v for k, v in kwargs.items() if k == "token"}))
        hub = self

        class Api:
            def create_repo(self, repo_id, **kw):
                hub.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
                return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

            def create_branch(self, repo_id, **kw):
                hub.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

            def upload_folder(self, *, repo_id, folder_path, allow_patterns, **kw):
                folder = Path(folder_path)
                every = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                files = sorted(hf.utils.filter_repo_objects(every, allow_patterns=allow_patterns))
                hub.calls.append(("upload_folder", {"repo_id": repo_id, **kw}))
                hub.uploaded[repo_id] = {f: (folder / f).read_bytes() for f in files}
                commit = _publish(hub.cache, repo_id, folder, kw.get("revision") or "main", files)
                return SimpleNamespace(oid=commit, commit_url=f"https://huggingface.co/{repo_id}/commit/{commit}")

        return Api()


@pytest.fixture
def fake_hub(monkeypatch, offline):
    hub = FakeHub(offline)
    monkeypatch.setattr(hf, "HfApi", hub.api)
    return hub


def test_push_to_hub_uploads_exactly_the_adapter_files_then_loads_by_id(fake_hub):
    model = _lora_model(4)  # LoRA after inject: ia.push_to_hub takes the PeftModel
    info = ia.push_to_hub(model, "org/inti-lora", token="hf_secret", private=True, revision="v2",
                          card={"num_frames": 4, "metrics": {"top1": 12.5}})
    assert info.oid
    assert sorted(fake_hub.uploaded["org/inti-lora"]) == [
        "README.md", "adapter_model.safetensors", "inti_config.json",
        "peft/README.md", "peft/adapter_config.json", "peft/adapter_model.safetensors"]
    names = [name for name, _ in fake_hub.calls]
    assert names == ["HfApi", "create_repo", "create_branch", "upload_folder"]
    kwargs = dict(fake_hub.calls)
    assert kwargs["HfApi"]["token"] == "hf_secret"
    assert kwargs["create_repo"] == {"repo_id": "org/inti-lora", "private": True, "exist_ok": True,
                                     "repo_type": "model"}
    assert kwargs["create_branch"]["branch"] == "v2"
    upload = kwargs["upload_folder"]
    assert upload["revision"] == "v2" and upload["delete_patterns"] == ["backbone_model.safetensors", "peft/*"]
    card = fake_hub.uploaded["org/inti-lora"]["README.md"].decode()
    assert 'ia.load_pretrained(backbone, "org/inti-lora")' in card and "| top1 | 12.50 |" in card
    loaded = ia.load_pretrained(make_vit(), "org/inti-lora", revision="v2", is_trainable=False)
    torch.testing.assert_close(_out(loaded), _out(model), rtol=0, atol=1e-6)


def test_save_pretrained_push_to_hub_and_model_method(tmp_path, fake_hub):
    model = _trained(ia.inject(make_vit(), layers=[1, 2], freeze_backbone=True), 5)
    ia.save_pretrained(model, tmp_path / "inti-vit", push_to_hub=True)  # repo name: the folder's
    assert sorted(fake_hub.uploaded["me/inti-vit"]) == ["README.md", "adapter_model.safetensors", "inti_config.json"]
    assert 'ia.load_pretrained(backbone, "me/inti-vit")' in (tmp_path / "inti-vit" / "README.md").read_text()
    model.push_to_hub("org/method", commit_message="first")
    assert dict(fake_hub.calls)["upload_folder"]["commit_message"] == "first"
    assert "create_branch" not in [name for name, _ in fake_hub.calls[-3:]]  # main: no branch to create
    loaded = ia.load_pretrained(make_vit(), "org/method")
    torch.testing.assert_close(_out(loaded), _out(model), rtol=0, atol=0)
    with pytest.raises(ValueError, match="options of push_to_hub=True"):
        model.save_pretrained(tmp_path / "x", repo_id="org/x")
    with pytest.raises(TypeError, match="unknown options"):
        model.save_pretrained(tmp_path / "x", push_to_hub=True, repo="org/x")
    assert not (tmp_path / "x").exists()


def test_card_and_log_of_a_save_with_the_backbone_say_so(tmp_path, caplog):
    """issue 24 item 8: a fully fine-tuned save writes the backbone file; the card and the log say it,
    and the card's "Use" section creates the backbone without pretrained weights."""
    import logging

    import timm

    vit = timm.create_model("vit_base_patch16_clip_224.openai", pretrained=False, num_classes=7, img_size=32,
                            patch_size=16, depth=2, embed_dim=32, num_heads=2)
    with caplog.at_level(logging.INFO, logger="inti_adapters.model"):
        ia.inject(vit, layers=[0]).save_pretrained(tmp_path / "full")  # everything trains: full fine-tuning
    size = (tmp_path / "full" / "backbone_model.safetensors").stat().st_size
    assert f"saved the backbone's weights too, {size / 1e6:.0f} MB, since it trains" in caplog.text
    text = (tmp_path / "full" / "README.md").read_text()
    assert f"`backbone_model.safetensors` ({size / 1e6:,.0f} MB)" in text
    assert ('timm.create_model("vit_base_patch16_clip_224.openai", pretrained=False, num_classes=7)  '
            "# no pretrained weights needed: they come from backbone_model.safetensors") in text
    ia.inject(timm.create_model("vit_base_patch16_clip_224.openai", pretrained=False, num_classes=7, img_size=32,
                                patch_size=16, depth=2, embed_dim=32, num_heads=2),
              layers=[0], freeze_backbone=True).save_pretrained(tmp_path / "full")  # the same folder, adapter only
    text = (tmp_path / "full" / "README.md").read_text()
    assert not (tmp_path / "full" / "backbone_model.safetensors").exists() and "backbone_model" not in text
    assert 'pretrained=True, num_classes=7)' in text
