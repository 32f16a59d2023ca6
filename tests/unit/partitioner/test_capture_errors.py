"""Compile's errors name their cause (issue 31, item 3): a factory that is no factory or that
raises, example inputs of the wrong shape, an output whose size depends on the data, and no
torch graph dump printed before the message."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import nn

import splitinfer as si
from splitinfer.cli import main
from splitinfer.errors import CaptureError, ConfigError


class PatchNet(nn.Module):
    """A ViT-like stem built for 32 x 32 images: 16 patches of 8 x 8 and a class token."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 8, 8)
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos = nn.Parameter(torch.zeros(1, 17, 8))

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], 1)
        return (tokens + self.pos).mean(1)


class Positives(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return y[y > 0]


class Branches(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor's value
            return x * 2
        return x


def test_a_wrong_input_shape_is_named_as_the_likely_cause():
    assert PatchNet()(torch.randn(1, 3, 32, 32)).shape == (1, 8)  # the shape it was built for
    with pytest.raises(ConfigError) as info:
        si.compile(PatchNet().eval(), (torch.randn(1, 3, 28, 28),), name="vit")
    message = str(info.value)
    assert "input shape is likely wrong" in message
    assert "float32[1, 3, 28, 28]" in message and "must match the size of tensor b (17)" in message
    assert ".item()" not in message and "torch.cond" not in message  # no advice about control flow


def test_an_output_whose_size_depends_on_the_data_says_so_and_what_to_do():
    with pytest.raises(CaptureError) as info:
        si.compile(Positives().eval(), (torch.randn(1, 4),), name="pos")
    message = str(info.value)
    assert "output 0 of model Positives has a size that depends on the data" in message
    assert "torch.where(y > 0, y, 0)" in message
    assert "cannot be recomputed" not in message


def test_torch_prints_nothing_before_our_message_and_its_logging_is_restored(capfd):
    names = ("torch", "torch.fx.experimental.symbolic_shapes", "torch.export")
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.disabled for lg in loggers]
    with pytest.raises(CaptureError, match=r"torch\.export cannot capture model Branches"):
        si.compile(Branches().eval(), (torch.randn(1, 4),), name="dd")
    err = capfd.readouterr().err
    assert "def forward" not in err and "Unable to find user code" not in err, err
    assert [lg.disabled for lg in loggers] == before


# -- the CLI's MODULE:FACTORY ----------------------------------------------------------------

FACTORIES = """\
import torch

not_a_factory = 3

def raises():
    raise FileNotFoundError("no weights file 'w.pt'")

def works():
    return torch.nn.Linear(4, 2)

instance = torch.nn.Linear(4, 2)
"""


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "first_day_factories.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # compile puts the cwd in front
    monkeypatch.delitem(sys.modules, "first_day_factories", raising=False)
    return tmp_path


def compile_cli(factory, out):
    return main(["compile", f"first_day_factories:{factory}", "--input-shape", "1,4", "--name", "f",
                 "--out", str(out)])  # fmt: skip


def test_cli_a_factory_that_is_not_callable_is_one_clear_line(factories, capsys):
    assert compile_cli("not_a_factory", factories / "o") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "first_day_factories:not_a_factory is an object of type int, not a model factory" in err


def test_cli_a_factory_that_raises_is_one_line_naming_it_and_the_exception(factories, capsys):
    assert compile_cli("raises", factories / "o") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "the model factory first_day_factories:raises raised FileNotFoundError" in err
    assert "first_day_factories.py:6: no weights file 'w.pt'" in err


@pytest.mark.parametrize("factory", ["works", "instance"])
def test_cli_a_factory_or_a_module_instance_compiles(factories, factory, capsys):
    assert compile_cli(factory, factories / factory) == 0, capsys.readouterr().err
    assert (factories / factory / "manifest.json").is_file()
