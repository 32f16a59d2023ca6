"""Cuts a user wants (issue 31, item 10): no cut repeats its neighbour's values, every cut is
named by module path and position first, and compile's verbose output times each step."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import splitinfer as si


class Attention(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.drop = nn.Dropout(0.1)  # in eval mode it passes its input on: a duplicate cut
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))

    def forward(self, x):
        x = x + self.drop(self.attn(self.norm(x)))
        return x + self.mlp(x)


class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x).contiguous()
        return self.head(x[:, 0])  # x[:, 0] is a whole slice of dim 0, then a select


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = TinyViT().eval()
    return model, si.compile(model, (torch.randn(1, 5, 8),), name="tinyvit", runtimes=("torch",))


def test_no_cut_holds_the_same_values_as_the_one_before_and_every_cut_is_exact(vit):
    model, bundle = vit
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        want = model(x)
        frontiers = [bundle.head(c.index, x) for c in bundle.cuts]
    for cut, before, here in zip(bundle.cuts[1:], frontiers, frontiers[1:]):
        same = len(before) == len(here) and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(before, here)
        )
        assert not same, f"cut {cut.index} ({cut.name}) repeats cut {cut.index - 1}"
    for cut, frontier in zip(bundle.cuts, frontiers):
        torch.testing.assert_close(bundle.tail(cut.index, frontier), want, rtol=1e-5, atol=1e-5)
    names = [c.name for c in bundle.cuts]
    assert not any("drop" in n or "slice" in n or "contiguous" in n for n in names), names


NAME = re.compile(
    r"input|output"
    r"|after [\w.]+( \(call \d+\))?"  # where a module's call ends
    r"|in [\w.]+( \(call \d+\))?, op \d+ of \d+ \(\w+\)"  # inside a module
    r"|after [\w.]+, op \d+ of \d+ \(\w+\)"  # an op of the model's own forward
)


def test_cuts_are_named_by_module_path_and_position_first(vit):
    _, bundle = vit
    names = [c.name for c in bundle.cuts]
    assert all(NAME.fullmatch(n) for n in names), names
    # Where modules end together, the outermost is named: not "after blocks.0.attn.proj".
    assert {"after blocks.0.attn", "after blocks.0.mlp", "after blocks.0"} <= set(names), names
    inside = [n for n in names if n.startswith("in blocks.0.attn, op ")]
    assert inside, names  # e.g. "in blocks.0.attn, op 9 of 12 (permute)"
    ops = [int(re.search(r"op (\d+) of (\d+)", n).group(1)) for n in inside]
    assert ops == sorted(ops) and len(set(re.search(r"of (\d+)", n).group(1) for n in inside)) == 1


def test_verbose_compile_prints_each_steps_time(capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    calibration = [(torch.randn(1, 6),) for _ in range(4)]
    bundle = si.compile(model, (torch.randn(1, 6),), name="timed", calibration=calibration,
                        codecs=["f32", "q8+zstd1"], profile=True, verbose=True)  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(rf"compiled timed: {len(bundle.cuts)} cuts in [\d.]+ s\n", out), out
    steps = ["capture and cuts", "calibration and fidelity table", "profile"]
    if "file" in bundle.onnx:
        steps.insert(1, "ONNX export and check")
    found = re.findall(r"^  (\S.*?)\s+([\d.]+) s$", out, re.MULTILINE)
    assert [step for step, _ in found] == steps, out
