"""A zoo of architectures for capture tests (each entry builds a model and its example inputs),
and the comparison those tests make: a split chain's outputs against the original's."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils import _pytree as pytree


def _seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


def _set_bn_stats(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics, as a trained net has."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def mlp():
    _seeded()
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 5)), (
        torch.randn(1, 20),
    )


def vgg():
    _seeded()
    layers, c = [], 3
    for width in (8, 16, 32):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)]
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        c = width
    layers += [nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10)]
    return nn.Sequential(*layers), (torch.randn(1, 3, 32, 32),)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 16, 1))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32, 1))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet():
    _seeded()
    return _set_bn_stats(ResNetish()), (torch.randn(1, 3, 32, 32),)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


def mobilenet():
    _seeded()
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU6(),
        InvertedResidual(16, 16, 1, 4),
        InvertedResidual(16, 24, 2, 4),
        InvertedResidual(24, 24, 1, 4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 10),
    )
    return _set_bn_stats(model), (torch.randn(1, 3, 32, 32),)


class InceptionBlock(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.b1 = nn.Conv2d(cin, 8, 1)
        self.b3 = nn.Sequential(nn.Conv2d(cin, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1))
        self.b5 = nn.Sequential(nn.Conv2d(cin, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 5, padding=2))
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(cin, 8, 1))

    def forward(self, x):
        return torch.relu(torch.cat([self.b1(x), self.b3(x), self.b5(x), self.pool(x)], dim=1))


def inception():
    _seeded()
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        InceptionBlock(16),
        InceptionBlock(32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    return model.eval(), (torch.randn(1, 3, 16, 16),)


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.norm2 = nn.LayerNorm(d)

    def forward(self, x, pad_mask):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad_mask, need_weights=False)[0]
        return x + self.ff(self.norm2(x))


class TinyTransformer(nn.Module):
    """Token ids and a padding mask in; class logits out (a BERT-style encoder)."""

    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, layers: int = 2, seq: int = 12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, seq, d) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, tokens, pad_mask):
        x = self.embed(tokens) + self.pos
        for layer in self.layers:
            x = layer(x, pad_mask)
        keep = (~pad_mask).unsqueeze(-1).float()
        pooled = (self.norm(x) * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.head(pooled)


def transformer():
    _seeded()
    tokens = torch.randint(0, 50, (1, 12))
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[:, 9:] = True
    return TinyTransformer().eval(), (tokens, mask)


class MultiIO(nn.Module):
    """Two inputs (an image and a feature vector); a dict holding a tuple out."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.vec = nn.Linear(6, 8)
        self.cls = nn.Linear(16, 4)
        self.aux = nn.Linear(8, 2)

    def forward(self, image, features):
        a = torch.relu(self.conv(image)).mean((2, 3))
        b = torch.tanh(self.vec(features))
        joint = torch.cat([a, b], dim=1)
        return {"logits": self.cls(joint), "aux": (self.aux(a), b * 2)}


def multi_io():
    _seeded()
    return MultiIO().eval(), (torch.randn(1, 3, 8, 8), torch.randn(1, 6))


ZOO = {
    "mlp": mlp,
    "vgg": vgg,
    "resnet": resnet,
    "mobilenet": mobilenet,
    "inception": inception,
    "transformer": transformer,
    "multi_io": multi_io,
}


class TinyClassifier(nn.Module):
    """Six classes over 3 x 8 x 8 images: untrained, yet its answers vary with the input (tanh
    keeps the features centred; the logits scaled so that its softmax is confident). The early
    exits' and the trained bottleneck's tests train on it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1),
            nn.Tanh(),
        )
        self.fc = nn.Linear(16 * 2 * 2, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1)) * 8


def seeded_rows(n: int, seed: int, shape=(3, 8, 8)):
    """``n`` seeded random inputs of ``shape``, one input tuple (batch 1) each."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, *shape, generator=gen),) for _ in range(n)]


def batched(inputs, batch: int, seed: int = 1):
    """Fresh inputs like ``inputs`` at another batch size (token ids and masks stay valid)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in inputs:
        shape = (batch, *t.shape[1:])
        if t.dtype == torch.bool:
            m = torch.zeros(shape, dtype=torch.bool)
            m[..., -3:] = True
            out.append(m)
        elif not t.dtype.is_floating_point:
            out.append(torch.randint(0, 50, shape, generator=gen))
        else:
            out.append(torch.randn(shape, generator=gen))
    return tuple(out)


def assert_same_outputs(got, want):
    """A split chain's outputs equal the original module's: same structure, shapes and dtypes,
    values equal or within float32 rounding."""
    got_leaves, got_spec = pytree.tree_flatten(got)
    want_leaves, want_spec = pytree.tree_flatten(want)
    assert got_spec == want_spec
    for a, b in zip(got_leaves, want_leaves):
        assert a.shape == b.shape and a.dtype == b.dtype
        if not torch.equal(a, b):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
