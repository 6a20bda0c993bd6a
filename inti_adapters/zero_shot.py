"""Zero-shot video classification with a CLIP text tower.

A video CLIP model (``inject(clip_model, layers)``) returns the L2-normalised mean of the frame
embeddings; class scores are its cosine similarity to text embeddings of the class names,
scaled by ``logit_scale``:

    >>> import open_clip, torch, inti_adapters as ia
    >>> clip = open_clip.CLIP(embed_dim=16,  # a tiny CLIP; real ones: open_clip.create_model(...)
    ...     vision_cfg=dict(layers=4, width=32, head_width=16, patch_size=8, image_size=32),
    ...     text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1))
    >>> tokenizer = lambda texts: torch.randint(1, 64, (len(texts), 8))   # e.g. open_clip.get_tokenizer(name)
    >>> classifier = ia.build_zero_shot_classifier(clip, tokenizer, ["archery", "bowling"],
    ...                                            ["a video of a person doing {}."])
    >>> video_model = ia.inject(clip, layers=[1, 2])
    >>> video = torch.randn(2, 3, 8, 32, 32)
    >>> logits = ia.zero_shot_logits(video_model(video), classifier)
    >>> logits.shape
    torch.Size([2, 2])

or, with the scoring inside the model (its state dict then holds the classifier):

    >>> video_model.unload() is clip
    True
    >>> video_model = ia.inject(clip, layers=[1, 2], head=ia.ZeroShotHead(classifier))
    >>> torch.allclose(video_model(video), logits, atol=1e-5)
    True

A head given to ``inject`` receives the frame-averaged embedding *before* normalisation;
:class:`ZeroShotHead` normalises it itself, so both ways give the same logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .model import InTIModel

Template = str | Callable[[str], str]


def _fill(template: Template, name: str) -> str:
    if callable(template):
        text = template(name)
        if not isinstance(text, str):
            raise TypeError(f"a template callable must return a str, got {type(text).__name__} for {name!r}")
        return text
    if not isinstance(template, str):
        raise TypeError(f"templates must be str (with '{{}}' for the class name) or callables, got {template!r}")
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' placeholder for the class name")
    return template.replace("{}", name)


def _text_model(clip_model: nn.Module) -> nn.Module:
    model = clip_model.backbone if isinstance(clip_model, InTIModel) else clip_model
    if not callable(getattr(model, "encode_text", None)):
        raise TypeError(
            f"expected an OpenCLIP model with encode_text (e.g. open_clip.CLIP), got {type(model).__name__}; "
            "pass the whole CLIP model, not its visual tower"
        )
    return model


@torch.no_grad()
def build_zero_shot_classifier(
    clip_model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[Template],
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Text classifier ``(embed_dim, num_classes)`` for zero-shot classification.

    Each column is the mean over templates of the L2-normalised text embeddings of one class,
    normalised again (the CLIP recipe). The model's train/eval mode is left as it is: call
    ``clip_model.eval()`` first if its text tower uses dropout.

    Args:
        clip_model: An OpenCLIP model with ``encode_text`` (or an ``InTIModel`` around one).
        tokenizer: Maps a list of strings to a ``(len(strings), context_length)`` integer tensor,
            e.g. ``open_clip.get_tokenizer(name)``.
        class_names: One name per class, in label order.
        templates: Prompt templates: strings with ``{}`` for the class name, or callables.
        device: Where to run the text tower; defaults to the device of the model's parameters.
        batch_size: Prompts encoded per text-tower call.
    """
    model = _text_model(clip_model)
    if isinstance(class_names, str) or not class_names:
        raise ValueError(f"class_names must be a non-empty list of strings, got {class_names!r}")
    if isinstance(templates, str) or not templates:
        raise ValueError(f"templates must be a non-empty list (e.g. ['a video of {{}}.']), got {templates!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if device is None:
        ref = next(model.parameters(), None)
        device = ref.device if ref is not None else torch.device("cpu")
    texts = [_fill(t, str(name)) for name in class_names for t in templates]
    embeddings = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        tokens = tokenizer(chunk)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != len(chunk):
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise TypeError(
                f"tokenizer must return a ({len(chunk)}, context_length) tensor for {len(chunk)} strings, got {got}"
            )
        embeddings.append(F.normalize(model.encode_text(tokens.to(device)), dim=-1))
    per_prompt = torch.cat(embeddings).unflatten(0, (len(class_names), len(templates)))
    return F.normalize(per_prompt.mean(dim=1), dim=-1).T.contiguous()


def zero_shot_logits(
    video_embedding: torch.Tensor, classifier: torch.Tensor, logit_scale: float | torch.Tensor = 100.0
) -> torch.Tensor:
    """``logit_scale * normalize(video_embedding) @ classifier``: ``(B, D), (D, K) -> (B, K)``.

    The embedding is normalised here (a no-op for a whole-CLIP video model's output), so the
    unnormalised output of a visual-tower video model can be passed as well.
    """
    if not isinstance(video_embedding, torch.Tensor) or not isinstance(classifier, torch.Tensor):
        raise TypeError(
            f"expected tensors, got video_embedding={type(video_embedding).__name__}, "
            f"classifier={type(classifier).__name__}"
        )
    if classifier.dim() != 2:
        raise ValueError(f"classifier must be (embed_dim, num_classes), got shape {tuple(classifier.shape)}")
    if video_embedding.dim() < 1 or video_embedding.shape[-1] != classifier.shape[0]:
        raise ValueError(
            f"video embedding of shape {tuple(video_embedding.shape)} does not match a classifier for "
            f"embed_dim {classifier.shape[0]} (shape {tuple(classifier.shape)}); was the classifier built "
            "with the same CLIP model?"
        )
    emb = F.normalize(video_embedding, dim=-1)
    return logit_scale * (emb @ classifier.to(emb.dtype))


class ZeroShotHead(nn.Module):
    """Video head that scores the video embedding against a fixed text classifier.

    Use as ``inject(clip_model, layers, head=ZeroShotHead(classifier))``. The classifier and the
    scale are buffers (saved with the adapter, not trained).

    Args:
        classifier: ``(embed_dim, num_classes)`` from :func:`build_zero_shot_classifier`.
        logit_scale: Multiplier of the cosine similarities (100 as in CLIP evaluation).
    """

    def __init__(self, classifier: torch.Tensor, logit_scale: float = 100.0) -> None:
        super().__init__()
        if not isinstance(classifier, torch.Tensor) or classifier.dim() != 2:
            got = tuple(classifier.shape) if isinstance(classifier, torch.Tensor) else type(classifier).__name__
            raise ValueError(f"classifier must be an (embed_dim, num_classes) tensor, got {got}")
        if not float(logit_scale) > 0:
            raise ValueError(f"logit_scale must be > 0, got {logit_scale!r}")
        self.register_buffer("classifier", classifier.detach().clone())
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    @classmethod
    def from_clip(
        cls,
        clip_model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        class_names: Sequence[str],
        templates: Sequence[Template],
        *,
        logit_scale: float = 100.0,
        **kwargs,
    ) -> ZeroShotHead:
        """Build the classifier with :func:`build_zero_shot_classifier` and wrap it."""
        return cls(build_zero_shot_classifier(clip_model, tokenizer, class_names, templates, **kwargs), logit_scale)

    @property
    def num_classes(self) -> int:
        return int(self.classifier.shape[1])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return zero_shot_logits(features, self.classifier, self.logit_scale)

    def extra_repr(self) -> str:
        return f"embed_dim={self.classifier.shape[0]}, num_classes={self.num_classes}"
