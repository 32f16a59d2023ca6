"""Bandwidth traces and named network profiles of the link emulator.

A trace is ``<seconds> <Mbit/s>`` per line, looped: a piecewise-constant rate over time that
:class:`~splitinfer.netem.LinkEmulator` integrates exactly. The real traces that ship with
splitinfer (``netem/traces``, package data) load by name; :data:`PROFILES` names typical networks.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from splitinfer.errors import ConfigError

__all__ = ["PROFILES", "BandwidthTrace", "NetworkProfile", "shipped_traces"]


@dataclass(frozen=True)
class BandwidthTrace:
    """A piecewise-constant rate over time, looped: ``rates_bps[i]`` holds from ``times[i]``."""

    times: tuple[float, ...]
    rates_bps: tuple[float, ...]
    period: float
    name: str = "trace"

    def __post_init__(self) -> None:
        if not self.times or len(self.times) != len(self.rates_bps):
            raise ConfigError("a trace needs as many rates as times, at least one")
        if self.times[0] != 0 or any(b <= a for a, b in zip(self.times, self.times[1:])):
            raise ConfigError("trace times must start at 0 and increase")
        if self.period <= self.times[-1] or any(r < 0 for r in self.rates_bps):
            raise ConfigError("a trace's period must exceed its last time, and rates must be >= 0")
        if max(self.rates_bps) <= 0:
            raise ConfigError("a trace must carry some bandwidth: every rate in it is zero")

    @classmethod
    def constant(cls, rate_bps: float) -> BandwidthTrace:
        if rate_bps <= 0:
            raise ConfigError(f"a link rate must be positive, got {rate_bps}")
        return cls((0.0,), (float(rate_bps),), 1.0, f"{rate_bps / 1e6:g}Mbit")

    @classmethod
    def parse(cls, text: str, name: str = "trace") -> BandwidthTrace:
        """``<seconds> <Mbit/s>`` lines; times may start anywhere (shifted to 0)."""
        times, rates = [], []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split()
            try:
                t, mbit = float(parts[0]), float(parts[1])
            except (IndexError, ValueError):
                raise ConfigError(
                    f"{name} line {number}: expected '<seconds> <Mbit/s>', got {line!r}"
                ) from None
            times.append(t)
            rates.append(max(0.0, mbit) * 1e6)
        if not times:
            raise ConfigError(f"{name} holds no samples")
        start = times[0]
        times = [t - start for t in times]
        step = times[-1] / (len(times) - 1) if len(times) > 1 else 1.0
        return cls(tuple(times), tuple(rates), times[-1] + step, name)

    @classmethod
    def load(cls, name_or_path: str | Path) -> BandwidthTrace:
        """A trace file, or the name of a trace shipped with splitinfer (:func:`shipped_traces`)."""
        path = Path(name_or_path)
        if path.is_file():
            return cls.parse(path.read_text(), path.name)
        shipped = shipped_traces()
        if str(name_or_path) in shipped:
            return cls.parse(shipped[str(name_or_path)].read_text(), str(name_or_path))
        raise ConfigError(
            f"no trace file {str(name_or_path)!r}; shipped traces: {', '.join(sorted(shipped))}"
        )

    def rate_at(self, t: float) -> float:
        t %= self.period
        return self.rates_bps[bisect.bisect_right(self.times, t) - 1]

    def mean_bps(self) -> float:
        """The time-weighted mean rate: each rate weighted by how long it holds, the rate a link
        following the trace delivers over one loop. Every mean of a trace in splitinfer is this
        one (docs/netem.md); the plain average of the samples is not what a link carries."""
        edges = [*self.times, self.period]
        return sum(r * (b - a) for r, a, b in zip(self.rates_bps, edges, edges[1:])) / self.period

    def finish_time(self, start: float, bits: float) -> float:
        """When a link following this trace, free at ``start``, has sent ``bits`` more bits."""
        t = start
        whole = self.mean_bps() * self.period
        loops = int(bits // whole) if whole > 0 else 0
        t += loops * self.period
        bits -= loops * whole
        # Walk the segments by index from the start's phase: recomputing the phase from a
        # growing float ``t`` can land a hair before a segment's end forever (t ~ 300 s), so the
        # phase is computed once and then advanced exactly.
        phase = t % self.period
        i = bisect.bisect_right(self.times, phase) - 1
        while bits > 1e-9:
            end = self.times[i + 1] if i + 1 < len(self.times) else self.period
            rate = self.rates_bps[i]
            span = max(0.0, end - phase)
            if rate * span >= bits:
                return t + bits / rate
            bits -= rate * span
            t += span
            i, phase = (i + 1, end) if i + 1 < len(self.times) else (0, 0.0)
        return t


def shipped_traces() -> dict[str, Path]:
    """The real traces that ship as package data, by name (file name without ``.txt``)."""
    folder = resources.files("splitinfer.netem") / "traces"
    return {p.name.removesuffix(".txt"): Path(str(p)) for p in folder.iterdir() if p.name.endswith(".txt")}


@dataclass(frozen=True)
class NetworkProfile:
    """A named network: uplink and downlink rates and the one-way delay."""

    uplink_bps: float
    downlink_bps: float
    delay_s: float
    note: str


#: Typical uplinks of mobile devices (uplink is what split inference sends on); documented in
#: docs/netem.md with their sources.
PROFILES: dict[str, NetworkProfile] = {
    "3g": NetworkProfile(1.5e6, 6e6, 0.050, "HSPA uplink: ~1.5 Mbit/s up, 6 down, 100 ms RTT"),
    "lte": NetworkProfile(8e6, 30e6, 0.025, "LTE: ~8 Mbit/s up, 30 down, 50 ms RTT"),
    "wifi": NetworkProfile(40e6, 80e6, 0.005, "Wi-Fi 5 at range: ~40 Mbit/s up, 80 down, 10 ms RTT"),
    "5g": NetworkProfile(60e6, 300e6, 0.010, "5G mid-band: ~60 Mbit/s up, 300 down, 20 ms RTT"),
}
