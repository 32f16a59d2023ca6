"""Helpers shared by the benchmarks: timing, the real model, the machine description."""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from splitinfer.lab import efficientnet_lite0  # noqa: F401  (re-exported for the benchmarks)

RESULTS = Path(__file__).resolve().parent / "results"
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
#: The trace sets the deployment benchmarks replay by default (``--traces``): the project's
#: read-only folder beside the repository (a worktree sits one level deeper).
_BESIDE = [p / "shared" / "traces" for p in Path(__file__).resolve().parents[2:4]]
DEFAULT_TRACES = next((p for p in _BESIDE if p.is_dir()), _BESIDE[0])


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__} (torch threads {torch.get_num_threads()})"
    )


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Seconds per call of each function, alternating between them so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


# -- deployment-like evaluations: the flags bench_policy.py and bench_e2e.py share ---------------


def is_trace_file(p: Path) -> bool:
    """A trace file (``<seconds> <Mbit/s>`` per line): hidden files and README/LICENSE are not."""
    return p.is_file() and not p.name.startswith(".") and p.stem.upper() not in ("README", "LICENSE")


def trace_files(folder: Path, limit: int | None = None) -> list[Path]:
    """The trace files directly in ``folder``, sorted by name; ``limit``: at most that many,
    evenly spaced."""
    files = sorted(p for p in folder.iterdir() if is_trace_file(p))
    if limit is not None:
        files = files[:: max(1, len(files) // limit)][:limit]
    return files


def trace_sets(folder: Path, limit: int | None = None) -> dict[str, list[Path]]:
    """Every sub-folder of ``folder`` holding trace files is a set (named after it, any number of
    them); trace files directly in ``folder`` are one more set, named after ``folder``. Returns
    set name -> its files (``limit`` per set, evenly spaced). SystemExit if there are none."""
    if not folder.is_dir():
        raise SystemExit(f"--traces/--static-from: {folder} is not a folder")
    sets = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any(is_trace_file(p) for p in sub.iterdir()):
            sets[sub.name] = trace_files(sub, limit)
    if any(is_trace_file(p) for p in folder.iterdir()):
        sets[folder.name] = trace_files(folder, limit)
    if not sets:
        raise SystemExit(
            f"{folder} holds no trace files (`<seconds> <Mbit/s>` per line), nor sub-folders of them"
        )
    return sets


def parse_fleet(text: str) -> list[float]:
    """``--fleet 0.25,0.5,1,2,4``: device speeds as multiples of the median device's."""
    import argparse

    try:
        speeds = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fleet takes numbers separated by commas, got {text!r}") from None
    if not speeds or any(not (x > 0 and math.isfinite(x)) for x in speeds):
        raise argparse.ArgumentTypeError(f"--fleet speeds must be positive numbers, got {text!r}")
    return speeds


def fleet_speeds(fleet: list[float] | None, n: int, seed: int) -> list[float]:
    """Per trace (``n`` of them), its device's speed over the median device's: drawn uniformly
    from ``fleet`` (seeded), or 1 for every trace without a fleet."""
    import numpy as np

    draw = np.random.default_rng(seed + 7919)
    return [float(draw.choice(fleet)) if fleet else 1.0 for _ in range(n)]


def add_deployment_args(parser: Any, default_traces: Path) -> None:
    """``--traces DIR``, ``--static-from DIR``, ``--fleet``, ``--json FILE`` (docs/decision.md)."""
    parser.add_argument(
        "--traces",
        type=Path,
        default=default_traces,
        help="folder of trace sets: every sub-folder of trace files is a set, any number of them (files "
        "directly in it: one more set); default: the shipped norway-3g/ and fcc-hsdpa/",
    )
    parser.add_argument(
        "--static-from",
        type=Path,
        default=default_traces,
        help="folder of traces (and sub-folders) the deploy-time static and the median device are tuned "
        "on, before any evaluated trace is seen; default: the shipped traces",
    )
    parser.add_argument(
        "--fleet",
        type=parse_fleet,
        help="device speeds as multiples of the median device, e.g. 0.25,0.5,1,2,4: each trace's device "
        "is drawn from them (seeded); without it every trace runs the median device",
    )
    parser.add_argument(
        "--json", type=Path, help="also write a machine-readable summary here (per set and policy)"
    )


def load_average() -> str:
    """``uptime``'s load averages, for result files (the machine is shared)."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min, {os.cpu_count()} cores)"


def deploy_script(relative: str) -> ModuleType:
    """The Python file ``deploy/<relative>``, loaded by its path once (deploy/ is no package;
    tests/support/deploy.py loads it the same way)."""
    name = "splitinfer_deploy_" + Path(relative).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DEPLOY / relative)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def write_section(out: Path, heading: str, text: str) -> None:
    """Write ``text`` (a section starting with the line ``heading``) into the results file
    ``out``: in place of the section with that heading, else appended; other sections kept."""
    old = out.read_text() if out.exists() else ""
    start = old.find(heading)
    if start < 0:
        out.write_text(old.rstrip("\n") + "\n\n" + text)
    else:
        end = old.find("\n## ", start + len(heading))
        out.write_text(old[:start] + text + ("" if end < 0 else old[end:]))
