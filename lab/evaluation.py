"""The lab's evaluation API: what the demo (``splitinfer demo``) and the benchmarks share.

- the oracle: :class:`World` prices every candidate of a cost model over a :class:`Link` (a
  bandwidth trace as an emulator replays it) after the fact; :func:`kind_of` names a cut;
- static tuning in hindsight: :func:`choose_static` (the one (cut, codec) a deployment ships),
  :func:`tie_slowdown` (the device slowdown at which neither end wins), :func:`static_choice`,
  :func:`tuning_links`, :func:`stretch`, :func:`median_rate`;
- scenario runs: the models (:data:`MODELS`, :func:`prepare_bundle` into :func:`cache_root`),
  live sessions (:func:`live_stack`, :func:`run_priced`, :data:`POLICIES`), a shared cloud
  (:func:`run_shared`, :class:`Device`, :class:`SharedResult`);
- their reports: :class:`Record`, :func:`summarize`, :func:`p95`, :func:`write_csv`.

Importing it imports torch (the models and live sessions run it); ``splitinfer.lab`` itself
does not.
"""

from splitinfer.lab._demo import (
    MODELS,
    cache_root,
    median_rate,
    prepare_bundle,
    static_choice,
    stretch,
    tuning_links,
)
from splitinfer.lab._hindsight import Link, World, kind_of
from splitinfer.lab._live import POLICIES, live_stack, run_priced
from splitinfer.lab._report import Record, p95, summarize, write_csv
from splitinfer.lab._shared import Device, SharedResult, run_shared
from splitinfer.lab._tuning import TuningLink, choose_static, tie_slowdown

__all__ = [
    "MODELS",
    "POLICIES",
    "Device",
    "Link",
    "Record",
    "SharedResult",
    "TuningLink",
    "World",
    "cache_root",
    "choose_static",
    "kind_of",
    "live_stack",
    "median_rate",
    "p95",
    "prepare_bundle",
    "run_priced",
    "run_shared",
    "static_choice",
    "stretch",
    "summarize",
    "tie_slowdown",
    "tuning_links",
    "write_csv",
]
