"""Capture cost, run-time overhead of the segment chain, and the fidelity table's cost, on
EfficientNet-Lite0.

Writes benchmarks/results/capture.md. Run: `make bench` or `.venv/bin/python benchmarks/bench_capture.py`
(`--no-fidelity` skips the fidelity table, the longest part).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import RESULTS, efficientnet_lite0, interleaved, machine, median_ms

import splitinfer as si
from splitinfer.lab import photo_batch
from splitinfer.partitioner.fidelity import DEFAULT_CODECS, measure

#: The fidelity table before it was reworked (one tail per cut and codec family at batch 32 in
#: contiguous memory format, every cut, MSE ranges everywhere), measured once on this machine
#: with the same inputs and codecs; the old code is gone, so the number is kept here.
BEFORE = (
    "before the rework (2026-11-24, same machine, same 32 inputs and codecs, load average 8-11 "
    "from other work): {before}"
)
BEFORE_NUMBERS = "4368 s wall, about 1000 s CPU (read from ps; that run did not record it)"


def fidelity_lines(model: torch.nn.Module, bundle: si.Bundle, images: int) -> list[str]:
    """Time ``measure`` (what compile(calibration=...) runs) with the default codecs."""
    x = photo_batch(images, seed=1)
    calibration = [(x[i : i + 1],) for i in range(images)]
    load = os.getloadavg()
    w0, c0 = time.perf_counter(), time.process_time()
    fidelity, ranges, *_ = measure(bundle, calibration, list(DEFAULT_CODECS), progress=False)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    lossy = [r for r in fidelity["table"] if not r["codec"].startswith("f32")]
    methods = [r["method"] for by_base in ranges.values() for r in by_base.values()]
    counts = {m: methods.count(m) for m in ("minmax", "percentile", "mse")}
    return [
        "",
        "## Fidelity table",
        "",
        f"`compile(..., calibration=<{images} photo crops>)` with the default codecs "
        f'({", ".join(DEFAULT_CODECS)}) and `calibration_method="auto"`: '
        f"{len({r['cut'] for r in lossy})} cuts measured with lossy codecs "
        f"({len(lossy)} lossy rows), {len(bundle.cuts) - 1 - len({r['cut'] for r in lossy})} "
        'larger than the input skipped (docs/partitioning.md, "Fidelity table").',
        "",
        f"- now: {wall:.0f} s wall, {cpu:.0f} s CPU (load average {load[0]:.1f} when it started, "
        f"{os.getloadavg()[0]:.1f} when it ended, on {os.cpu_count()} cores)",
        "- " + BEFORE.format(before=BEFORE_NUMBERS),
        f"- ranges chosen per cut and codec: {counts}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS / "capture.md")
    parser.add_argument("--no-fidelity", action="store_true", help="skip timing the fidelity table")
    parser.add_argument("--fidelity-images", type=int, default=32)
    args = parser.parse_args()

    model = efficientnet_lite0()
    t0 = time.perf_counter()
    bundle = si.compile(model, (torch.randn(1, 3, 224, 224),), name="efficientnet-lite0")
    compile_s = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp())
    try:
        t0 = time.perf_counter()
        path = bundle.save(tmp / "b")
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = si.Bundle.load(path)
        load_s = time.perf_counter() - t0
        size_mib = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    finally:
        shutil.rmtree(tmp)
    weights_mib = sum(v.numel() * v.element_size() for v in model.state_dict().values()) / 2**20

    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        with torch.inference_mode():
            times = interleaved(
                {
                    "module": lambda x=x: model(x),
                    "chain": lambda x=x: loaded.tail(0, loaded.head(0, x)),
                },
                repeats=args.repeats if batch == 1 else max(5, args.repeats // 3),
            )
        module_ms, chain_ms = median_ms(times["module"]), median_ms(times["chain"])
        rows.append((batch, module_ms, chain_ms, chain_ms / module_ms))

    worst = max(r[3] for r in rows)
    verdict = "met" if worst <= 1.05 else "missed"
    lines = [
        "# Capture benchmark: EfficientNet-Lite0",
        "",
        "Reproduce: `make bench` (or `.venv/bin/python benchmarks/bench_capture.py`).",
        f"Machine: {machine()}. Shared and noisy: ratios are measured in one run, interleaved.",
        "",
        f"- cuts offered: {len(bundle.cuts)}; segments: {bundle.n_segments}",
        f"- compile (torch.export of the model and of every segment): {compile_s:.1f} s",
        f"- save: {save_s:.2f} s; load with sha256 checks: {load_s:.2f} s",
        f"- bundle on disk: {size_mib:.1f} MiB for {weights_mib:.1f} MiB of weights "
        f"({size_mib / weights_mib:.2f}x: each weight stored once)",
        "",
        "Full forward pass: the original module against the chain of all segments (median ms).",
        "",
        "| batch | module ms | segment chain ms | chain / module |",
        "|---:|---:|---:|---:|",
        *[f"| {b} | {m:.2f} | {c:.2f} | {r:.3f} |" for b, m, c, r in rows],
        "",
        f"Target: the chain no more than 5% slower than the module: **{verdict}** (worst ratio {worst:.3f}).",
    ]
    if not args.no_fidelity:
        lines += fidelity_lines(model, bundle, args.fidelity_images)
    lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
