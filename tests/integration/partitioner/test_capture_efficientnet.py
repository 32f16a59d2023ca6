"""Capture of a real network: every one of EfficientNet-Lite0's cuts (its ImageNet weights, 161 cuts)
is exact at batch 1 and 8. Slow (a real model, every cut run twice), so it lives apart from the
zoo's unit tests in tests/unit/partitioner/test_capture.py."""

from __future__ import annotations

import pytest
import torch

from tests.support.zoo import assert_same_outputs


@pytest.mark.slow
@pytest.mark.timeout(900)  # 161 cuts x 2 batch sizes: about 40 s alone, much more on a busy machine
def test_efficientnet_lite0_with_real_weights(efficientnet):
    model, bundle = efficientnet
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model(x)
        for cut in bundle.cuts:
            assert_same_outputs(bundle.tail(cut.index, bundle.head(cut.index, x)), want)
    assert len(bundle.cuts) > 100
