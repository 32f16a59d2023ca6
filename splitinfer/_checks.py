"""Checks of configuration values that say what was expected (STYLE.md item 8); ground floor."""

from __future__ import annotations

import math

from splitinfer.errors import ConfigError

__all__ = ["check_number"]


def check_number(
    what: str,
    value: object,
    *,
    lo: float = -math.inf,
    hi: float = math.inf,
    lo_open: bool = False,
    hi_open: bool = False,
    unit: str = "",
) -> float:
    """``value`` as a float if it is a finite int or float (not a bool) within the bounds.

    ``lo`` and ``hi`` are included unless ``lo_open`` / ``hi_open``. Otherwise ConfigError:
    "``what`` must be a finite number [of ``unit``] >= 0, got ..." (or "in [lo, hi)" when
    ``hi`` is finite).
    """
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        above = value > lo if lo_open else value >= lo
        below = value < hi if hi_open else value <= hi
        if above and below:
            return float(value)
    if math.isinf(hi):
        bound = f"{'>' if lo_open else '>='} {lo:g}"
    else:
        bound = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    of = f" of {unit}" if unit else ""
    raise ConfigError(f"{what} must be a finite number{of} {bound}, got {value!r}")
