"""Reading a bundle's device profiles: which profile, and its head and tail times per cut.

Shared by the cost model (``_costs``) and the estimator (``_estimate``), which both read the
profiles a manifest carries; no torch, no measuring (``_profile`` measures).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from splitinfer.errors import ConfigError
from splitinfer.manifest import Manifest

__all__ = ["chain_times", "pick_profile", "segment_medians"]


def pick_profile(bundle: Manifest, name: str | None) -> tuple[str, dict[str, Any]] | None:
    """The profile ``name`` of ``bundle`` (by default ``host`` if present, else the first one).

    ``None`` when the bundle has no profile and none was asked for; ConfigError for an unknown
    name.
    """
    profiles = bundle.profiles or {}
    if name is not None:
        if name not in profiles:
            have = ", ".join(sorted(profiles)) or "none"
            raise ConfigError(
                f"bundle {bundle.name!r} has no profile {name!r} (it has: {have}); "
                f"measure one with `splitinfer profile BUNDLE --name {name}`"
            )
        return name, profiles[name]
    if not profiles:
        return None
    chosen = "host" if "host" in profiles else next(iter(profiles))
    return chosen, profiles[chosen]


def segment_medians(bundle: Manifest, name: str, profile: Mapping[str, Any], batch: int) -> np.ndarray | None:
    seg = profile.get("segments", {}).get(str(batch))
    if seg is None:
        return None
    times = np.asarray(seg.get("median_s", []), dtype=np.float64)
    if times.shape != (bundle.n_segments,) or not np.all(np.isfinite(times)) or np.any(times < 0):
        raise ConfigError(
            f"profile {name!r} of bundle {bundle.name!r} must give {bundle.n_segments} finite, "
            f"non-negative segment times at batch {batch}, got {times.shape[0] if times.ndim else 0}; "
            f"profile the bundle again"
        )
    return times


def chain_times(bundle: Manifest, profile: str | None = None) -> tuple[list[float], list[float]] | None:
    """Profiled ``head(k)`` and ``tail(k)`` at batch 1 for every cut, or None without a profile."""
    picked = pick_profile(bundle, profile)
    if picked is None:
        return None
    seg = segment_medians(bundle, picked[0], picked[1], 1)
    if seg is None:
        return None
    head = np.concatenate([[0.0], np.cumsum(seg)])
    return head.tolist(), (head[-1] - head).tolist()
