"""What compile measures about each cut's codecs, public for the benchmarks that measure it
again on other inputs (benchmarks/bench_capture.py, benchmarks/_demo_cuts.py).

- :func:`measure`: the fidelity table, clip ranges, projections and dictionaries of a bundle's
  codecs on calibration inputs (``compile`` runs it);
- :func:`interval`: the 95 % confidence interval of a mean agreement;
- :data:`DEFAULT_CODECS`: the codecs compile measures when none are named;
- :data:`VECTORS_PER_CHANNEL`: the channel vectors a projection needs per channel.

Importing it imports torch.
"""

from splitinfer.partitioner._capture import DEFAULT_CODECS
from splitinfer.partitioner._fidelity import VECTORS_PER_CHANNEL, interval, measure

__all__ = ["DEFAULT_CODECS", "VECTORS_PER_CHANNEL", "interval", "measure"]
