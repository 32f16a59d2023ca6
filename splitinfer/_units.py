"""Rates and durations as people write them on a command line: ``2Mbit``, ``80ms``.

Rates are bits per second, written ``2Mbit``, ``500kbit``, ``1.5Gbit`` (``/s`` and ``bps`` forms
too, and ``kB/s``, ``MB/s`` for bytes); durations ``80ms``, ``0.1s``, ``250us``, ``1min``. A unit
is required: a bare ``2`` could mean bits, bytes, seconds or milliseconds.
"""

from __future__ import annotations

import math
import re

from splitinfer.errors import ConfigError

__all__ = ["parse_duration", "parse_rate"]

_RATE_UNITS = {
    "bit": 1.0,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "bps": 1.0,
    "kbps": 1e3,
    "mbps": 1e6,
    "gbps": 1e9,
}
_BYTE_UNITS = {"B": 8.0, "kB": 8e3, "KB": 8e3, "MB": 8e6, "GB": 8e9, "KiB": 8 * 1024.0, "MiB": 8 * 2.0**20}
_TIME_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0}
_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"


def parse_rate(text: str, what: str = "rate") -> float:
    """Bits per second from ``2Mbit``, ``500kbit/s``, ``1.5Gbit``, ``20mbps`` or ``250kB/s``."""
    m = re.fullmatch(_NUMBER + r"([A-Za-zµ]+)(/s)?\s*", str(text))
    if m:
        value, unit, per_s = float(m.group(1)), m.group(2), m.group(3)
        factor = _BYTE_UNITS.get(unit) if per_s else None
        if factor is None and unit.lower() in _RATE_UNITS and not (per_s and unit.lower().endswith("ps")):
            factor = _RATE_UNITS[unit.lower()]
        if factor is not None and value > 0 and math.isfinite(value * factor):
            return value * factor
    raise ConfigError(
        f"{what} must be a positive rate with a unit, such as 2Mbit, 500kbit, 1.5Gbit or 250kB/s; "
        f"got {text!r}"
    )


def parse_duration(text: str, what: str = "time") -> float:
    """Seconds from ``80ms``, ``0.1s``, ``250us`` (a unit is required)."""
    m = re.fullmatch(_NUMBER + r"([A-Za-zµ]+)\s*", str(text))
    if m and m.group(2) in _TIME_UNITS:
        value = float(m.group(1)) * _TIME_UNITS[m.group(2)]
        if math.isfinite(value):
            return value
    raise ConfigError(f"{what} must be a duration with a unit, such as 80ms, 0.1s or 250us; got {text!r}")
