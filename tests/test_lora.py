"""Composition with peft LoRA in both orders: trainable sets, training, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IMG, make_vit, static_video
from peft import LoraConfig, get_peft_model

import inti_adapters as ia

LORA = dict(r=4, lora_alpha=8, target_modules=["qkv"])


def _names(model, pred):
    return {n for n, p in model.named_parameters() if pred(n, p)}


def _train_two_steps(model, video, target):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):  # two steps: zero-initialised LoRA B / InTI head let gradients reach everything by step 2
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(video), target).backward()
        opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


VIDEO, TARGET = torch.randn(2, 3, 4, IMG, IMG), torch.tensor([0, 3])


@pytest.mark.parametrize("train_head", [True, False])
def test_lora_then_inject(train_head, capsys):
    peft_vit = get_peft_model(make_vit(), LoraConfig(**LORA))
    model = ia.inject(peft_vit, layers=[1, 2], train_head=train_head)
    assert model.host.name == "timm"
    expected = _names(model, lambda n, p: "lora_" in n or n.startswith("compressors.")
                      or (train_head and ".head." in n and "lora" not in n))
    assert _names(model, lambda n, p: p.requires_grad) == expected
    assert any("lora_A" in n for n in expected) and any(n.startswith("compressors.") for n in expected)
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert f"peft: {n_lora:,}/{n_lora:,}" in out and "backbone: 0/" in out
    model.train()
    assert _train_two_steps(model, VIDEO, TARGET) == expected


def test_inject_then_lora():
    model = ia.inject(make_vit(), layers=[1, 2])
    # plain get_peft_model would freeze the InTI layers; add_lora keeps them trainable
    peft_model = ia.add_lora(model, LoraConfig(**LORA))
    expected = _names(peft_model, lambda n, p: "lora_" in n or ".compressors." in n
                      or (".backbone.head." in n))
    assert _names(peft_model, lambda n, p: p.requires_grad) == expected
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for n, p in peft_model.named_parameters() if n in expected)
    peft_model.train()
    assert _train_two_steps(peft_model, VIDEO, TARGET) == expected


def test_plain_get_peft_model_after_inject_freezes_inti_which_is_why_add_lora_exists():
    model = ia.inject(make_vit(), layers=[1, 2])
    get_peft_model(model, LoraConfig(**LORA))
    assert not any(p.requires_grad for p in model.compressors.parameters())


def test_static_video_invariant_with_fresh_lora():
    vit = make_vit()
    video, frame = static_video()
    with torch.no_grad():
        ref = vit(frame)
        a = ia.inject(get_peft_model(vit, LoraConfig(**LORA)), layers=[1, 2]).eval()
        torch.testing.assert_close(a(video), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", ["before_inject", "after_inject"])
def test_save_and_load_inti_and_lora_together(order, tmp_path):
    torch.manual_seed(0)
    if order == "before_inject":
        model = ia.inject(get_peft_model(make_vit(), LoraConfig(**LORA)), layers=[1, 2])
    else:
        model = ia.add_lora(ia.inject(make_vit(), layers=[1, 2]), LoraConfig(**LORA))
    model.train()
    _train_two_steps(model, VIDEO, TARGET)
    model.eval()
    with torch.no_grad():
        ref = model(VIDEO)
    ia.save_pretrained(model, tmp_path)
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "backbone_model.safetensors").exists()
    assert json.loads((tmp_path / "inti_config.json").read_text())["peft"]["order"] == order

    loaded = ia.load_pretrained(make_vit(), tmp_path).eval()  # one call restores everything
    with torch.no_grad():
        torch.testing.assert_close(loaded(VIDEO), ref, atol=0, rtol=0)
    trainable = _names(loaded, lambda n, p: p.requires_grad)
    assert any("lora_" in n for n in trainable) and any("compressors." in n for n in trainable)


def test_lora_targets_that_match_nothing():
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] match no module.*try \['qkv'\]"):
        ia.add_lora(ia.inject(make_vit(), layers=[1]), LoraConfig(r=4, target_modules=["nope"]))


def test_lora_preset():
    cfg = ia.lora_preset(make_vit(), r=8)
    assert set(cfg.target_modules) == {"qkv"} and cfg.r == 8
    model = ia.inject(get_peft_model(make_vit(), cfg), layers=[1, 2])
    assert any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


# -- OpenCLIP: LoRA on nn.MultiheadAttention ------------------------------------------------------
def _clip():
    from test_open_clip import make_clip

    return make_clip("clip_vit").eval()


def test_openclip_preset_targets_only_the_visual_towers_attention():
    clip = _clip()
    cfg = ia.lora_preset(clip, r=4)
    peft_clip = get_peft_model(clip, cfg)
    lora = [n for n, p in peft_clip.named_parameters() if "lora_" in n]
    assert lora and all(".visual.transformer.resblocks." in n for n in lora)
    assert not any(n.startswith("base_model.model.transformer.") for n in lora)  # the text tower


@pytest.mark.parametrize("order", ["before_inject", "after_inject"])
def test_openclip_lora_both_orders_train_and_round_trip(order, tmp_path):
    from test_open_clip import IMG as CLIP_IMG

    torch.manual_seed(0)
    video = torch.randn(2, 3, 4, CLIP_IMG, CLIP_IMG)
    with torch.no_grad():
        ref_image = _clip().encode_image(video[:, :, 0], normalize=True)
    clip = _clip()
    if order == "before_inject":
        model = ia.inject(get_peft_model(clip, ia.lora_preset(clip, r=4)), layers=[1, 2])
    else:
        model = ia.add_lora(ia.inject(clip, layers=[1, 2]), ia.lora_preset(clip, r=4))
    with torch.no_grad():  # fresh LoRA + fresh InTI: a static video gives the image embedding
        static = video[:, :, :1].expand(-1, -1, 4, -1, -1)
        torch.testing.assert_close(model(static), ref_image, atol=1e-5, rtol=0)
    trainable = _names(model, lambda n, p: p.requires_grad)
    assert any("lora_" in n for n in trainable) and any("compressors." in n for n in trainable)
    assert all("lora_" in n or "compressors." in n or n.endswith("visual.proj") for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        opt.zero_grad()
        model(video).pow(2).sum().backward()
        opt.step()
    # peft's LoRA for nn.MultiheadAttention merges into the frozen in_proj weight for each forward and
    # unmerges afterwards, which is not bit-exact: frozen weights may move by float rounding only
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert all(moved[n] > 0 for n in trainable)
    assert max(d for n, d in moved.items() if n not in trainable) < 1e-6
    model.eval()
    with torch.no_grad():
        ref = model(video)
    ia.save_pretrained(model, tmp_path)
    loaded = ia.load_pretrained(_clip(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(video), ref, atol=1e-6, rtol=0)  # MHA merge/unmerge rounding


@pytest.mark.parametrize("order", ["before_inject", "after_inject"])
def test_given_state_dict_feeds_the_peft_file_too(order, tmp_path):
    """What a ZeRO-3 export does: the live modules are empty, the gathered state dict is not."""
    if order == "before_inject":
        model = ia.inject(get_peft_model(make_vit(), LoraConfig(**LORA)), layers=[1, 2])
    else:
        model = ia.add_lora(ia.inject(make_vit(), layers=[1, 2]), LoraConfig(**LORA))
    model.train()
    _train_two_steps(model, VIDEO, TARGET)
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model.eval()(VIDEO)
        for p in model.parameters():  # what the live modules look like when partitioned
            p.zero_()
    ia.save_pretrained(model, tmp_path, state_dict=gathered)
    loaded = ia.load_pretrained(make_vit(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(VIDEO), ref, atol=0, rtol=0)


def test_composed_model_under_compile_and_bf16_autocast():
    """InTI + temporal adapters + LoRA together: torch.compile equals eager, bf16 autocast runs."""
    model = ia.inject(get_peft_model(make_vit(), LoraConfig(**LORA)), layers=[1, 2], temporal=[
        {"name": "local_mhra", "blocks": "all"}, {"name": "global_mhra", "blocks": {"last": 2}}])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial adapters and LoRA
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    with torch.no_grad():
        ref = model(VIDEO)
        out = torch.compile(model, backend="aot_eager")(VIDEO)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(VIDEO)
    torch.testing.assert_close(low.float(), ref, atol=0.1, rtol=0.1)


# -- issue 24 item 1: the natural call saves everything -----------------------------------------------
def _trained_inti_lora_model():
    """InTI + temporal adapter + head + LoRA, every part moved away from its initial value."""
    torch.manual_seed(0)
    model = ia.add_lora(ia.inject(make_vit(), layers=[1, 2], temporal=[{"name": "local_mhra", "blocks": [3]}]),
                        LoraConfig(**LORA))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.mark.parametrize("how", ["peft_method", "ia_function"])
def test_saving_a_lora_model_saves_inti_layers_adapters_head_and_lora(how, tmp_path):
    model = _trained_inti_lora_model()
    with torch.no_grad():
        ref = model(VIDEO)
    if how == "peft_method":
        model.save_pretrained(tmp_path)  # the PeftModel's own method, the natural call
    else:
        ia.save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "inti_config.json").read_text())
    assert cfg["peft"]["order"] == "after_inject" and cfg["inject"]["layers"] == [1, 2]
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    loaded = ia.load_pretrained(make_vit(), tmp_path).eval()  # the same (frozen, "pretrained") backbone weights
    with torch.no_grad():
        torch.testing.assert_close(loaded(VIDEO), ref, atol=0, rtol=0)
    # and the reloaded model saves everything again through the same natural call
    loaded.save_pretrained(tmp_path / "again")
    again = ia.load_pretrained(make_vit(), tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(VIDEO), ref, atol=0, rtol=0)


def test_peft_save_options_keep_their_meaning(tmp_path):
    model = _trained_inti_lora_model()
    model.save_pretrained(tmp_path / "not_main", is_main_process=False)
    assert not (tmp_path / "not_main").exists()  # peft's convention: only the main process writes
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "pickle", safe_serialization=False)
    assert not (tmp_path / "pickle").exists()


def test_a_lora_model_still_deep_copies_and_pickles_with_its_whole_model_save(tmp_path):
    import copy
    import pickle

    model = _trained_inti_lora_model()
    twin = copy.deepcopy(model)
    assert type(twin) is type(model)  # the PeftModel, not the InTIModel inside it
    assert twin.save_pretrained.model is twin  # bound to the copy, not the original
    with torch.no_grad():
        torch.testing.assert_close(twin(VIDEO), model(VIDEO), atol=0, rtol=0)
    twin.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ia.load_pretrained(make_vit(), tmp_path).eval()(VIDEO), model(VIDEO), atol=0, rtol=0)
    try:
        pickle.dumps(model)
    except Exception as e:  # the injected model itself may not pickle; the routing must not be the reason
        assert "_WholeModelMethod" not in str(e)


def test_print_trainable_parameters_after_add_lora_keeps_the_per_part_breakdown(capsys):
    model = ia.add_lora(ia.inject(make_vit(), layers=[1, 2]), LoraConfig(**LORA))
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    n_comp = sum(p.numel() for n, p in model.named_parameters() if ".compressors." in n)
    assert f"peft: {n_lora:,}/{n_lora:,}" in out and f"compressors: {n_comp:,}/{n_comp:,}" in out
    assert "backbone: 0/" in out
