"""What a new user meets first on the device: numpy on torch, tensors that require grad, and
offered codecs this environment cannot encode (issue 31 item 8, issue 30 item 3)."""

from __future__ import annotations

import copy
import logging
import sys

import numpy as np
import pytest
import torch

from splitinfer.edge import EdgeClient
from splitinfer.errors import ConfigError


def test_numpy_on_the_torch_runtime_says_what_to_pass(cnn_bundle):
    x = np.zeros((1, 3, 32, 32), dtype=np.float32)
    with pytest.raises(ConfigError, match=r"pass a torch tensor .*runtime='onnxruntime'"):
        cnn_bundle.head(2, x)


def test_heads_and_tails_do_not_require_grad(cnn_bundle):
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    for k in (0, 2, cnn_bundle.last_cut):
        frontier = cnn_bundle.head(k, x)
        assert not any(t.requires_grad for t in frontier)
        frontier[0].numpy()  # the first thing a user does with it
        out = cnn_bundle.tail(k, frontier)
        assert not out.requires_grad


def test_the_client_says_once_which_offered_codecs_it_cannot_encode(cnn_bundle, caplog, monkeypatch):
    """Without the rANS coder (``constriction``), a bundle's ``+ans`` codecs are named with the
    install line, instead of being skipped by the policies without a word."""
    offered = copy.copy(cnn_bundle)
    offered.codecs = [*cnn_bundle.codecs, "q8+ans"]
    monkeypatch.setitem(sys.modules, "constriction", None)  # import constriction raises ImportError
    with caplog.at_level(logging.WARNING, logger="splitinfer.edge"):
        client = EdgeClient("http://127.0.0.1:9", bundle=offered, policy="local")
    assert set(client.unencodable) == {"q8+ans"}
    lines = [r.getMessage() for r in caplog.records if "cannot encode" in r.getMessage()]
    assert len(lines) == 1 and "q8+ans" in lines[0] and "pip install 'splitinfer[entropy]'" in lines[0]
