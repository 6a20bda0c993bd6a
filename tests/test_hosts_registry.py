"""A user can describe a new host without editing the library."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import inti_adapters as ia
from inti_adapters.hosts import _base


class ToyViT(nn.Module):
    """A minimal ViT that is not from timm: class token + 2x2 grid, 3 blocks."""

    def __init__(self, dim=8, classes=3):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
                                    for _ in range(3))
        self.fc = nn.Linear(dim, classes)

    def tokens(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, x):
        return self.fc(self.tokens(x)[:, 0])


@pytest.fixture
def toy_host():
    @ia.register_host("toy_vit")
    class ToyHost(ia.Host):
        @classmethod
        def matches(cls, model):
            return isinstance(model, ToyViT)

        blocks = property(lambda self: self.model.layers)
        embed_dim = property(lambda self: self.model.cls.shape[-1])
        num_prefix_tokens = property(lambda self: 1)
        cls_index = property(lambda self: 0)

        def grid_size(self, h, w):
            return (h // 4, w // 4)

        def forward_features(self, frames):
            return self.model.tokens(frames)

        def pool(self, tokens):
            return tokens[:, 0]

        def classify(self, feats):
            return self.model.fc(feats)

        def head_module_names(self):
            return ["fc"]

    yield ToyHost
    _base._HOSTS.pop("toy_vit")


def test_registered_host_is_detected_and_keeps_the_invariant(toy_host):
    torch.manual_seed(0)
    toy = ToyViT().eval()
    frame = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = toy(frame)
        model = ia.inject(toy, layers=[0, 1])
        assert model.host.name == "toy_vit"
        out = model(frame[:, :, None].expand(-1, -1, 4, -1, -1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert model.frame_schedule(4) == [4, 2, 1]


def test_duplicate_host_name_is_refused(toy_host):
    with pytest.raises(ValueError, match="already registered"):
        ia.register_host("toy_vit")(toy_host)


def test_a_host_written_with_head_still_works_and_is_told_the_new_name():
    with pytest.warns(DeprecationWarning, match=r"head\(features\) is now called classify"):
        class OldHost(ia.Host):
            def head(self, feats):
                return feats * 2

    assert torch.equal(OldHost(nn.Identity()).classify(torch.ones(2)), torch.full((2,), 2.0))
