"""The trained bottleneck (issue 32, item 3; experimental): a few-channel low-bit latent at a
cut, trained with the model frozen, smaller than the float frontier."""

from __future__ import annotations

import pytest
import torch

import splitinfer as si
from splitinfer.errors import ConfigError
from splitinfer.partitioner._bottleneck import Bottleneck, latent_bytes, train_bottleneck
from splitinfer.partitioner._learn import Training
from tests.unit.partitioner.test_exits import TinyClassifier, _rows


def test_a_bottleneck_trains_with_the_model_frozen_and_sends_few_bytes():
    model = TinyClassifier().eval()
    bundle = si.compile(model, (torch.randn(1, 3, 8, 8),), name="tiny", runtimes=("torch",))
    k = next(c.index for c in bundle.cuts if len(c.tensors) == 1 and c.tensors[0].shape[1] == 16)
    x = torch.cat([r[0] for r in _rows(8, 5)])
    before = bundle.run_segments(0, bundle.n_segments, (x,))[0]
    module, record = train_bottleneck(bundle, k, _rows(48, 1), Training(steps=40, views=2), latent=2, bits=2)
    after = bundle.run_segments(0, bundle.n_segments, (x,))[0]
    assert torch.equal(before, after)  # the model is frozen
    assert record["loss"][-1][1] < record["loss"][0][1]
    module.eval()
    with torch.no_grad():
        frontier = bundle.head(k, x)[0]
        codes = module.encode(frontier)
        out = bundle.tail(k, [module.decode(codes)])
    assert codes.min() >= 0 and codes.max() <= 3 and torch.equal(codes, codes.round())
    assert out.shape == before.shape
    sizes = latent_bytes(codes)
    assert len(sizes) == 8 and max(sizes) < bundle.cut(k).nbytes / 4
    with pytest.raises(ConfigError, match="bits"):
        Bottleneck(16, 2, 9)
