"""Reading a bundle's device profiles: which profile, and its head and tail times per cut.

Shared by the cost model (``_costs``) and the estimator (``_estimate``), which both read the
profiles a manifest carries; no torch, no measuring (``_profiling`` measures).

A profile's ``segments`` are torch's times; ``runtimes.onnxruntime.segments`` (when the bundle
has an ONNX graph and the profile was taken with onnxruntime installed) are ONNX Runtime's.
:func:`segment_medians` reads those of the runtime asked for, and falls back to torch's for a
profile that lacks them (profiles taken before ONNX Runtime was a runtime), so that old
profiles price as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from splitinfer.errors import ConfigError
from splitinfer.manifest import Manifest

__all__ = ["chain_times", "exit_times", "pick_profile", "runtime_of", "segment_medians"]


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


def runtime_of(bundle: Manifest) -> str:
    """The runtime ``bundle``'s segments run on in this process (a Manifest alone: torch)."""
    runtime = getattr(bundle, "runtime", "torch")
    return runtime if isinstance(runtime, str) else "torch"


def segment_medians(
    bundle: Manifest, name: str, profile: Mapping[str, Any], batch: int, runtime: str = "torch"
) -> np.ndarray | None:
    """Profile ``name``'s per-segment medians at ``batch`` on ``runtime`` (torch's where the
    profile has none for it), None when it has none at that batch; ConfigError if malformed."""
    source = profile
    if runtime != "torch":
        by_runtime = (profile.get("runtimes") or {}).get(runtime)
        if isinstance(by_runtime, Mapping) and str(batch) in (by_runtime.get("segments") or {}):
            source = by_runtime
    seg = source.get("segments", {}).get(str(batch))
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


def exit_times(bundle: Manifest, name: str, profile: Mapping[str, Any], batch: int = 1) -> dict[int, float]:
    """Profile ``name``'s time of each early exit's head at ``batch`` (seconds, by cut; torch's:
    the exit heads are timed on torch). Empty for a profile without them (taken before the exit
    heads were profiled, or of a bundle without exits): such exits are priced at 0 s, the head's
    time to the exit alone. ConfigError if malformed."""
    times = (profile.get("exits") or {}).get(str(batch)) or {}
    if not isinstance(times, Mapping):
        raise ConfigError(
            f"profile {name!r} of bundle {bundle.name!r} has malformed exit times at batch {batch}; "
            "profile the bundle again"
        )
    out = {}
    for cut, seconds in times.items():
        value = float(seconds) if isinstance(seconds, int | float) else float("nan")
        if not np.isfinite(value) or value < 0:
            raise ConfigError(
                f"profile {name!r} of bundle {bundle.name!r} must give a finite, non-negative time "
                f"for the exit at cut {cut}, got {seconds!r}; profile the bundle again"
            )
        out[int(cut)] = value
    return out


def chain_times(
    bundle: Manifest,
    profile: str | None = None,
    *,
    head_runtime: str | None = None,
    tail_runtime: str = "torch",
) -> tuple[list[float], list[float]] | None:
    """Profiled ``head(k)`` and ``tail(k)`` at batch 1 for every cut, or None without a profile.

    Heads are priced on ``head_runtime`` (default: the runtime ``bundle`` runs on here, the
    edge's), tails on ``tail_runtime`` (the cloud's; default torch, the server's default)."""
    picked = pick_profile(bundle, profile)
    if picked is None:
        return None
    head_seg = segment_medians(bundle, picked[0], picked[1], 1, head_runtime or runtime_of(bundle))
    tail_seg = segment_medians(bundle, picked[0], picked[1], 1, tail_runtime)
    if head_seg is None or tail_seg is None:
        return None
    head = np.concatenate([[0.0], np.cumsum(head_seg)])
    cum = np.concatenate([[0.0], np.cumsum(tail_seg)])
    return head.tolist(), (cum[-1] - cum).tolist()
