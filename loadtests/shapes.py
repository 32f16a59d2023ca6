"""Load shapes: how many emulated devices are active over the run.

Pick one with ``SPLITLOAD_SHAPE=ramp|step|spike|diurnal`` (read by the locustfile when it is
imported; unset: locust's own constant ``--users`` at ``--spawn-rate``). Every shape reads the
usual options: ``--users`` is its peak, ``--run-time`` its length (default 120 s when unset)
and ``--spawn-rate`` how fast it adds or removes devices. Device counts are rounded to a
multiple of the number of user classes (one per policy), so that every policy always has the
same number of devices.

=========== =================================================================================
``ramp``    linear from one device per policy to the peak over the first 60%, then holds
``step``    four equal steps: a quarter of the peak, a half, three quarters, all
``spike``   30% of the peak, the whole peak from 50% to 65% of the run, then 30% again
``diurnal`` one compressed day: a cosine from 20% (night) to the peak (midday) and back
=========== =================================================================================
"""

from __future__ import annotations

import math
import os
from abc import abstractmethod

from locust import LoadTestShape

__all__ = ["SHAPES", "DiurnalShape", "RampShape", "SpikeShape", "StepShape"]

DEFAULT_RUN_TIME_S = 120.0
DEFAULT_PEAK = 20


class _PolicyShape(LoadTestShape):
    """Shared plumbing: peak, duration, spawn rate and rounding to whole policy groups."""

    abstract = True
    use_common_options = True

    def _options(self) -> object:
        runner = self.runner
        return getattr(getattr(runner, "environment", None), "parsed_options", None)

    def peak(self) -> int:
        users = getattr(self._options(), "num_users", None)
        return int(users or os.environ.get("SPLITLOAD_USERS", DEFAULT_PEAK))

    def duration(self) -> float:
        run_time = getattr(self._options(), "run_time", None)
        return float(run_time or os.environ.get("SPLITLOAD_DURATION", DEFAULT_RUN_TIME_S))

    def spawn_rate(self) -> float:
        return float(getattr(self._options(), "spawn_rate", None) or 5.0)

    @abstractmethod
    def fraction(self, t: float) -> float:
        """Share of the peak active ``t`` (0..1) of the way through the run; each shape defines it."""

    def tick(self) -> tuple[int, float] | None:
        elapsed = self.get_run_time()
        length = self.duration()
        if elapsed >= length:
            return None
        groups = max(1, len(getattr(self.runner, "user_classes", None) or [None]))
        users = self.peak() * self.fraction(elapsed / length)
        return max(groups, round(users / groups) * groups), self.spawn_rate()


class RampShape(_PolicyShape):
    def fraction(self, t: float) -> float:
        return min(1.0, t / 0.6)


class StepShape(_PolicyShape):
    def fraction(self, t: float) -> float:
        return min(4, math.floor(t * 4) + 1) / 4


class SpikeShape(_PolicyShape):
    def fraction(self, t: float) -> float:
        return 1.0 if 0.5 <= t < 0.65 else 0.3


class DiurnalShape(_PolicyShape):
    def fraction(self, t: float) -> float:
        return 0.2 + 0.8 * (1 - math.cos(2 * math.pi * t)) / 2


SHAPES: dict[str, type[LoadTestShape]] = {
    "ramp": RampShape,
    "step": StepShape,
    "spike": SpikeShape,
    "diurnal": DiurnalShape,
}
