"""The server images (``make image``): their sizes, container start to ready with a cached
bundle, and three ONNX Runtime containers behind the shipped HAProxy config under load with one
replica killed (kill -9) and one stopped (SIGTERM).

    python benchmarks/bench_image.py [--starts 5] [--requests 120] [--venvs FREE_VENV TORCH_VENV]

Prints a markdown report (the figures docs/deploy.md and benchmarks/results/scale.md quote).
``--venvs`` also compares the sizes of two virtual environments (a torch-free
``splitinfer[edge,serve]`` one and the same with ``torch``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import deploy_script, machine

import splitinfer as si
from splitinfer.lab import demo_model

containers = deploy_script("containers.py")
Container, engine, image, readable_copy = (
    containers.Container,
    containers.engine,
    containers.image,
    containers.readable_copy,
)


def du_mib(path: Path) -> float:
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) / 1024


def starts(eng: str, name: str, models: Path, work: Path, n: int) -> list[float]:
    """Seconds from `run` to readiness, ``n`` times (the bundle in the page cache after the first)."""
    seconds = []
    for i in range(n + 1):
        with Container(eng, name, models, work, f"si-bench-start-{i}") as c:
            took = c.wait_ready()
        if i:  # the first run warms the page cache and the engine's image store
            seconds.append(took)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--requests", type=int, default=120, help="requests per phase of the fault run")
    parser.add_argument("--venvs", nargs=2, type=Path, metavar=("FREE", "TORCH"))
    args = parser.parse_args()
    eng = engine()
    if eng is None:
        raise SystemExit("bench_image: needs podman or docker (make image first)")
    lines = [f"machine: {machine()}", f"engine: {Path(eng).name}", ""]
    model = demo_model(seed=0)
    bundle = si.compile(model, (torch.rand(1, 3, 32, 32),), name="democnn")
    with tempfile.TemporaryDirectory(prefix="bench-image-") as tmp:
        work = Path(tmp)
        bundle.save(work / "repo" / "democnn")
        os.chmod(work, 0o755)
        models = readable_copy(work / "repo", work / "models")
        sizes = {v: image.size_bytes(eng, image.image_name(v)) / 2**20 for v in image.VARIANTS}
        head = f"| image | size (MiB) | start to ready, median (min..max) of {args.starts} |"
        lines += [head, "|---|---:|---|"]
        for v in image.VARIANTS:
            s = starts(eng, image.image_name(v), models, work, args.starts)
            lines.append(
                f"| {image.image_name(v)} | {sizes[v]:.0f} | {statistics.median(s):.2f} s "
                f"({min(s):.2f}..{max(s):.2f}) |"
            )
        lines += ["", f"size ratio onnxruntime / torch: {sizes['onnxruntime'] / sizes['torch']:.3f}", ""]
        ort = image.image_name("onnxruntime")
        phases, status, _ = containers.faults_behind_haproxy(
            eng, ort, models, work, bundle, model, args.requests, args.requests
        )
        head = "| fault (3 ORT containers, HAProxy) | requests | lost | wrong | on device | p50 ms | p99 ms |"
        lines.append(head)
        lines += ["|---|---:|---:|---:|---:|---:|---:|"]
        for what, f in phases.items():
            counts = f"{f.requests} | {f.errors} | {f.wrong} | {f.fell_back}"
            lines.append(f"| {what} | {counts} | {f.p50_ms:.1f} | {f.p99_ms:.1f} |")
        lines += ["", f"SIGTERM'd container exit status: {status}"]
    if args.venvs:
        free, full = (du_mib(p) for p in args.venvs)
        lines += ["", f"venv torch-free {args.venvs[0]}: {free:.0f} MiB;"]
        lines += [f"with torch {args.venvs[1]}: {full:.0f} MiB;"]
        lines += [f"ratio {free / full:.3f}"]
    lines += ["", f"load after: {Path('/proc/loadavg').read_text().strip()}"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
