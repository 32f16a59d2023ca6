"""What compile learns from unlabelled inputs, public for the benchmarks that train it again on
other inputs (benchmarks/bench_learned.py); docs/learning.md describes both.

- :class:`Training`: the budget and seed of a distillation (steps, seconds, augmentation);
- :func:`pick_exits`, :func:`train_exits`, :func:`calibrate_threshold`: early-exit heads,
  picked by cost, distilled from the model's own output, their thresholds calibrated;
- :func:`train_bottleneck`, :func:`latent_bytes`, :func:`trained`: the trained bottleneck of the
  ``bn<latent>q<bits>`` codecs, trained again on other inputs, and bound as their codec
  (``get_codec(spec, bottleneck=trained(module, frontier_shape, bits))``);
- :func:`load_images`: a folder of images as compile's ``--calibration/--evaluation/--train``
  read it (labels from the leading integer of each file name).

Importing it imports torch.
"""

from splitinfer.partitioner._bottleneck import latent_bytes, train_bottleneck, trained
from splitinfer.partitioner._exits import calibrate_threshold, pick_exits, train_exits
from splitinfer.partitioner._inputs import load_images
from splitinfer.partitioner._learn import Training

__all__ = [
    "Training",
    "calibrate_threshold",
    "latent_bytes",
    "load_images",
    "pick_exits",
    "train_bottleneck",
    "train_exits",
    "trained",
]
