r"""Recordings of real frontiers for the locust load tests (``splitinfer loadtest prepare``).

A load-test user emulates an edge device: it decides per request with the real policy, waits
out its emulated head compute and uplink, and sends a real encoded frontier of the chosen cut
and codec. Computing those frontiers needs torch; locust workers should not. So
:func:`prepare` runs real inputs through the bundle's heads once, encodes the frontiers with
the bundle's calibrated codecs, and writes them with everything the policies need (the
bundle's manifest: cuts, codecs, fidelity table and profiles) into one file that
:class:`Recording` reads without torch: ``Recording.bundle`` is the real
:class:`~splitinfer.manifest.Manifest`, each frame's specs real
:class:`~splitinfer.tensors.TensorSpec`\ s, as the edge SDK and the wire protocol use them.

Only the (cut, codec) pairs some policy can choose are recorded: every pair a policy allows
that is within its exploration margin of the optimum somewhere on a wide grid of estimates
(uplink 10 kbit/s to 10 Gbit/s, round trip plus queueing 0 to 4 s, device 0.25 to 256 times
the profiled speed, cloud 0.25 to 64 times). A decision outside that set, which needs
estimates beyond the grid, is reported by the load test as a failure, not silently replaced.

File format (version 2; version 1 held a subset of the manifest)::

    b"SPLITREC" | uint32 LE version | uint64 LE index length | msgpack index | payloads

    index = {"bundle": the bundle's manifest.json document (``Manifest.to_json()``),
             "frames": {"CUT CODEC": [[offset, length, [[dtype, shape], ...]], ...]},
             "static": [cut, codec], "inputs": "photos" | "random", "samples": int,
             "created": iso8601, "policies": {policy: [[cut, codec], ...]}}

Offsets count from the start of the payload region. Nothing in it is pickled.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import math
import mmap
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack

from splitinfer.errors import BundleError, ConfigError
from splitinfer.manifest import Manifest
from splitinfer.tensors import TensorSpec

__all__ = ["Recording", "format_summary", "prepare"]

MAGIC = b"SPLITREC"
FORMAT_VERSION = 2
_PREFIX = struct.Struct("<8sIQ")
#: Largest index accepted (the payloads are mapped, not read).
_MAX_INDEX = 64 * 1024 * 1024


class Recording:
    """A recording file opened read-only: the bundle's manifest and memory-mapped frames.

    ``frames(cut, codec)`` lists ``(payload, tensors)`` pairs: the encoded frontier of one real
    input (a memoryview into the mapped file) and its specs for the request header.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with self.path.open("rb") as f:
                prefix = f.read(_PREFIX.size)
                if len(prefix) < _PREFIX.size:
                    raise BundleError(f"{self.path} is not a load-test recording (too short)")
                magic, version, length = _PREFIX.unpack(prefix)
                if magic != MAGIC:
                    raise BundleError(
                        f"{self.path} is not a load-test recording; make one with "
                        f"`splitinfer loadtest prepare BUNDLE --out FILE`"
                    )
                if version != FORMAT_VERSION:
                    raise BundleError(
                        f"{self.path} is recording format {version}; this reads {FORMAT_VERSION}"
                    )
                if length > _MAX_INDEX:
                    raise BundleError(f"{self.path}: index of {length} bytes exceeds {_MAX_INDEX}")
                index = msgpack.unpackb(f.read(length), raw=False, strict_map_key=False)
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise BundleError(f"cannot read recording {self.path}: {exc}") from None
        except (ValueError, msgpack.ExtraData, msgpack.FormatError) as exc:
            raise BundleError(f"{self.path}: the index is not valid msgpack ({exc})") from None
        self.index: dict[str, Any] = index
        # The manifest without its zstd dictionaries' bytes: the frames are encoded already.
        self.bundle = Manifest.from_json(index["bundle"])
        self.inputs = str(index.get("inputs", ""))
        static = index.get("static")
        self.static: tuple[int, str] | None = None if static is None else (int(static[0]), str(static[1]))
        base = _PREFIX.size + length
        view = memoryview(self._map)
        self._frames: dict[tuple[int, str], list[tuple[memoryview, tuple[TensorSpec, ...]]]] = {}
        for key, entries in index["frames"].items():
            cut, codec = key.split(" ", 1)
            frames = []
            for offset, nbytes, tensors in entries:
                start = base + int(offset)
                if start + int(nbytes) > len(self._map):
                    raise BundleError(f"{self.path} is truncated: frame {key} runs past its end")
                specs = tuple(TensorSpec(tuple(map(int, shape)), str(dtype)) for dtype, shape in tensors)
                frames.append((view[start : start + int(nbytes)], specs))
            self._frames[(int(cut), codec)] = frames

    @property
    def pairs(self) -> list[tuple[int, str]]:
        """Every recorded (cut, codec), in cut order."""
        return sorted(self._frames)

    def __contains__(self, pair: object) -> bool:
        return pair in self._frames

    def frames(self, cut: int, codec: str) -> list[tuple[memoryview, tuple[TensorSpec, ...]]]:
        """The recorded frames of ``(cut, codec)``; KeyError if it was not recorded."""
        return self._frames[(cut, codec)]


# -- writing (needs torch) ----------------------------------------------------------------------

#: Where the reachable (cut, codec) pairs are collected: every policy's choice anywhere here is
#: recorded. The cost model only sees rtt + queue, so one axis covers both.
WIDE_GRID = {
    "uplink_bps": [10 ** (4 + i / 4) for i in range(25)],  # 10 kbit/s .. 10 Gbit/s
    "rtt_s": [0.0, 0.005, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0],
    "device_slowdown": [2 ** (i / 2) for i in range(-4, 17)],  # 0.25 .. 256
    "cloud_slowdown": [0.25, 0.5, 1, 2, 4, 8, 16, 64],
}
#: Where adaptive's exploration targets (near-optimal pairs) are collected: the conditions of
#: the shipped fleet, give or take. Over the wide grid nearly every pair is near-optimal
#: somewhere (a long round trip dwarfs every other difference), which would record the whole
#: table (about 200 MB per input for EfficientNet-Lite0).
EXPLORE_GRID = {
    "uplink_bps": [10 ** (5 + i / 4) for i in range(13)],  # 100 kbit/s .. 100 Mbit/s
    "rtt_s": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3],
    "device_slowdown": [2 ** (i / 2) for i in range(13)],  # 1 .. 64
    "cloud_slowdown": [0.5, 1, 2, 4, 8],
}
#: How much faster the downlink is than the uplink on the grids.
_DOWN_OVER_UP = (1.0, 4.0)


@functools.lru_cache(maxsize=4)
def _grid_weights(grid: str) -> Any:
    """The cost model's weight vector (``latency_weights``) at every point of a grid."""
    import numpy as np

    from splitinfer.partitioner import Estimates, latency_weights

    axes = {"wide": WIDE_GRID, "explore": EXPLORE_GRID}[grid]
    weights = []
    for up, rtt, dev, cloud, ratio in itertools.product(*axes.values(), _DOWN_OVER_UP):
        est = Estimates(
            uplink_bps=up, downlink_bps=up * ratio, rtt_s=rtt, device_slowdown=dev, cloud_slowdown=cloud
        )
        weights.append(latency_weights(est))
    return np.asarray(weights)


def reachable_pairs(
    bundle: Any, policy: Any, margin: float = 0.0, grid: str = "wide"
) -> set[tuple[int, str]]:
    """Every (cut, codec) ``policy`` may send somewhere on ``grid`` (``wide`` or ``explore``):
    its best, or within ``margin`` of its best (what exploration may take)."""
    import numpy as np

    from splitinfer.partitioner import CostModel, Estimates

    model = CostModel(bundle)
    allowed = [
        (c.cut, c.codec)
        for c in policy.explain(Estimates(uplink_bps=1e6, downlink_bps=4e6, rtt_s=0.1)).candidates
        if c.feasible
    ]
    rows = [
        model.local if k == model.n else k * len(model.codecs) + model.codecs.index(c) for k, c in allowed
    ]
    features = np.asarray(model.features)[rows]
    w = _grid_weights(grid)
    hit = np.zeros(len(rows), dtype=bool)
    for start in range(0, len(w), 4096):
        objective = w[start : start + 4096] @ features.T
        best = objective.min(axis=1, keepdims=True)
        hit |= (objective <= best * (1.0 + margin) + 1e-12).any(axis=0)
    return {allowed[i] for i in range(len(rows)) if hit[i] and allowed[i][0] != model.n}


def _expected_bytes(bundle: Any, pair: tuple[int, str]) -> float:
    for row in (bundle.fidelity or {}).get("table", []):
        if (int(row["cut"]), str(row["codec"])) == pair and row.get("bytes") is not None:
            return float(row["bytes"])
    return float(bundle.cuts[pair[0]].nbytes)


def default_static(bundle: Any, fidelity_budget: float) -> tuple[int, str]:
    """A hand-tuned split for a typical 3G device: the best (cut, codec) strictly between the
    ends (not all in the cloud, not all on the device) for a 1.5 Mbit/s uplink, a 100 ms round
    trip and a device 8 times slower than the profiled host."""
    from splitinfer.partitioner import CostModel, Estimates

    model = CostModel(bundle)
    est = Estimates(uplink_bps=1.5e6, downlink_bps=6e6, rtt_s=0.1, device_slowdown=8.0)
    feasible = model.feasible(fidelity_budget, None)
    best, best_s = None, math.inf
    for row in range(len(model)):
        k = int(model.cut[row])
        if 0 < k < model.n and feasible[row]:
            latency = sum(model.stages(row, est).values())
            if latency < best_s:
                best, best_s = (k, model.codec(row)), latency
    if best is None:
        raise ConfigError(
            f"bundle {bundle.name!r} has no feasible split between its ends at fidelity budget "
            f"{fidelity_budget}; pass --static CUT:CODEC"
        )
    return best


def _inputs(bundle: Any, samples: int, seed: int) -> tuple[list[tuple[Any, ...]], str]:
    """Real photos for a one-image model (3 x H x H float), else seeded random inputs."""
    import torch

    from splitinfer.tensors import dtype_from_name

    specs = bundle.inputs
    if len(specs) == 1 and specs[0].dtype == "float32" and len(specs[0].shape) == 4:
        _, c, h, w = specs[0].shape
        if c == 3 and h == w and h is not None:
            try:
                from splitinfer.lab._images import photo_batch

                batch = photo_batch(samples, size=int(h), seed=seed)
                return [(batch[i : i + 1],) for i in range(samples)], "photos"
            except ConfigError:
                pass  # no examples extra: random inputs below
    gen = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(samples):
        one = []
        for s in specs:
            shape = tuple(1 if d is None else d for d in s.shape)
            dtype = dtype_from_name(s.dtype)
            if dtype.is_floating_point:
                one.append(torch.randn(shape, generator=gen, dtype=dtype))
            else:
                one.append(torch.zeros(shape, dtype=dtype))
        inputs.append(tuple(one))
    return inputs, "random"


def prepare(
    bundle_dir: str | Path,
    out: str | Path,
    *,
    samples: int = 4,
    seed: int = 0,
    fidelity_budget: float = 0.99,
    static: tuple[int, str] | None = None,
    explore_margin: float = 0.1,
    explore_mib: float = 32.0,
    progress: bool = False,
) -> dict[str, Any]:
    """Record real frontiers of the bundle at ``bundle_dir`` into ``out``; returns a summary.

    ``samples`` real inputs for every pair some policy may choose as its best (over
    :data:`WIDE_GRID`); then, one input each, the pairs adaptive's exploration may take under
    :data:`EXPLORE_GRID`, smallest first, up to ``explore_mib`` MiB. ``static`` is the (cut,
    codec) of the ``static`` policy (default :func:`default_static`). The bundle needs a
    profile (``splitinfer profile``): the adaptive and neurosurgeon policies need one.
    """
    import torch

    from splitinfer.bundle import Bundle
    from splitinfer.partitioner import make_policy
    from splitinfer.tensors import specs_of

    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    bundle = Bundle.load(Path(bundle_dir))
    if not bundle.profiles:
        raise ConfigError(
            f"bundle {bundle.name!r} has no profile; the adaptive and neurosurgeon policies need one: "
            f"run `splitinfer profile {bundle_dir}` first"
        )
    static = static or default_static(bundle, fidelity_budget)
    adaptive = make_policy("adaptive", bundle, fidelity_budget=fidelity_budget)
    policies = {
        "adaptive": adaptive,
        "neurosurgeon": make_policy("neurosurgeon", bundle),
        "cloud": make_policy("cloud", bundle, fidelity_budget=fidelity_budget),
        "static": make_policy("static", bundle, cut=static[0], codec=static[1]),
    }
    reach = {name: reachable_pairs(bundle, p) for name, p in policies.items()}
    best = set().union(*reach.values())
    explore: set[tuple[int, str]] = set()
    room = explore_mib * 2**20
    near = reachable_pairs(bundle, adaptive, explore_margin, grid="explore") - best
    for pair in sorted(near, key=lambda p: (_expected_bytes(bundle, p), p)):
        if _expected_bytes(bundle, pair) > room:
            break
        room -= _expected_bytes(bundle, pair)
        explore.add(pair)
    pairs = sorted(best | explore)
    inputs, kind = _inputs(bundle, samples, seed)
    blob = bytearray()
    frames: dict[str, list[list[Any]]] = {}
    cuts = sorted({k for k, _ in pairs})
    for n, k in enumerate(cuts, 1):
        if progress and (n == 1 or n % 10 == 0 or n == len(cuts)):
            print(f"recording cut {k} ({bundle.cuts[k].name}): {n}/{len(cuts)}", flush=True)
        needed = samples if any(p in best for p in pairs if p[0] == k) else 1
        fronts = [bundle.head(k, *x) for x in inputs[:needed]]
        for codec in sorted(c for kk, c in pairs if kk == k):
            enc = bundle.codec_for(k, codec)
            entries = []
            for frontier in fronts if (k, codec) in best else fronts[:1]:
                with torch.inference_mode():
                    payload = enc.encode(list(frontier))
                entries.append(
                    [len(blob), len(payload), [[s.dtype, list(s.shape)] for s in specs_of(frontier)]]
                )
                blob += payload
            frames[f"{k} {codec}"] = entries
    index = {
        "bundle": bundle.manifest.to_json(),
        "frames": frames,
        "static": [static[0], static[1]],
        "inputs": kind,
        "samples": samples,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "policies": {name: sorted([k, c] for k, c in r) for name, r in reach.items()},
        "explore": sorted([k, c] for k, c in explore),
    }
    packed = msgpack.packb(index, use_bin_type=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(packed)))
            f.write(packed)
            f.write(blob)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "path": str(out),
        "pairs": len(pairs),
        "cuts": cuts,
        "bytes": _PREFIX.size + len(packed) + len(blob),
        "static": static,
        "inputs": kind,
        "per_policy": {name: len(r) for name, r in reach.items()},
        "explore": len(explore),
        "explore_left_out": len(near) - len(explore),
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    per = ", ".join(f"{name} {n}" for name, n in summary["per_policy"].items())
    return (
        f"wrote {summary['path']}: {summary['pairs']} (cut, codec) pairs at {len(summary['cuts'])} cuts "
        f"(best somewhere: {per}; adaptive's exploration: {summary['explore']} more, "
        f"{summary['explore_left_out']} left out), {summary['bytes'] / 2**20:.1f} MiB, "
        f"{summary['inputs']} inputs; "
        f"static policy: cut {summary['static'][0]} {summary['static'][1]}"
    )
