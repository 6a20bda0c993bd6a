"""`make demo`: a short inference demo (replaced by the training demo on the built-in data set).

Builds ViT-B/16 (CLIP layout) on the meta device to count GFLOPs for a 16-frame clip, naive vs
InTI at the paper's three insertion points, then runs a small real ViT on a random clip.
"""

from __future__ import annotations

import time

import timm
import torch

import inti_adapters as ia

SETTINGS = {"naive": [], "early": [2, 4], "middle": [4, 6], "late": [6, 8]}
PAPER = {"naive": 281, "early": 147, "middle": 182, "late": 217}


def main() -> None:
    print(f"inti_adapters {ia.__version__}: GFLOPs of ViT-B/16 on 16 x 224^2 frames (one view)")
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=400)
        video = torch.empty(1, 3, 16, 224, 224)
    naive = None
    print(f"{'setting':<8} {'layers':<8} {'GFLOPs':>8} {'vs naive':>9} {'paper':>6}")
    for name, layers in SETTINGS.items():
        model = ia.inject(vit, layers=layers)
        g = ia.count_gflops(model, video)
        model.unload()
        naive = naive or g
        print(f"{name:<8} {str(layers):<8} {g:8.1f} {100 * (g / naive - 1):+8.1f}% {PAPER[name]:6d}")

    torch.manual_seed(0)
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=112).eval()
    model = ia.inject(small, layers=[4, 6])
    clip = torch.randn(2, 3, 16, 112, 112)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(clip)
    print(f"\nViT-Ti/16 at 112^2 with InTI layers=[4, 6]: video {tuple(clip.shape)} -> logits {tuple(logits.shape)} "
          f"in {time.perf_counter() - t0:.2f} s; frames per block: {model.frame_schedule(16)}")
    model.print_trainable_parameters()


if __name__ == "__main__":
    main()
