"""Runtime benchmark: ONNX Runtime against torch eager, on EfficientNet-Lite0 (real weights).

Same run, interleaved (benchmarks/_common.py ``interleaved``):

1. head latency at batch 1 for several cuts and the whole model (and the whole model at batch
   8), torch (the fused fx chain the bundle runs) against ONNX Runtime (one fused session per
   range, docs/runtimes.md), at 1 thread and at the default threads;
2. server throughput and p99 at the mid and late cuts with each runtime, against LitServe
   (benchmarks/bench_server.py's harness and client, its ``--runtimes`` hook);
3. cold start of the edge, in a fresh process: import + load the bundle + the first answer
   (policy ``local``, the bundle on local disk), with each runtime;
4. the installed size of a venv with ``pip install .[edge]`` against one with ``pip install
   .[torch]`` (CPU torch), both built for real from this checkout in a temporary directory.

Writes benchmarks/results/runtime.md. Run: `.venv/bin/python benchmarks/bench_runtime.py`
(about ten minutes; `--quick` for a smoke run; `--skip-server`, `--skip-venv` leave parts out).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))

MODEL = "efficientnet-lite0"


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def bench_heads(bundle_dir: Path, repeats: int) -> list[tuple[str, str, int, dict[str, float]]]:
    """(what, threads, batch, {runtime: median ms}) for heads of several cuts and the whole model."""
    import torch
    from _common import interleaved, median_ms

    import splitinfer as si

    rows = []
    cores = os.cpu_count() or 1
    tb = si.Bundle.load(bundle_dir)
    last = tb.last_cut
    cuts = [c for c in (20, 77, 120, last) if c <= last]
    for threads in (1, cores):
        torch.set_num_threads(threads)
        ob = si.Bundle.load(bundle_dir, runtime="onnxruntime", threads=threads)
        for batch in (1, 8):
            x = torch.rand(batch, 3, 224, 224)
            xn = x.numpy()
            for k in cuts if batch == 1 else [last]:
                what = "whole model" if k == last else f"head({k}) {tb.cuts[k].name}"
                times = interleaved(
                    {
                        "torch": lambda k=k, x=x: tb.head(k, x),
                        "onnxruntime": lambda k=k, xn=xn, ob=ob: ob.head(k, xn),
                    },
                    repeats,
                )
                row = {name: median_ms(t) for name, t in times.items()}
                rows.append((what, str(threads), batch, row))
                print(f"{what:<40} threads {threads} batch {batch}: {row}", flush=True)
    torch.set_num_threads(cores)
    return rows


COLD = """
import time
t0 = time.perf_counter()
import numpy as np
from splitinfer.edge import EdgeClient
client = EdgeClient("http://127.0.0.1:9", bundle={bundle!r}, policy="local", runtime={runtime!r})
x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
if {runtime!r} == "torch":  # the torch runtime takes torch tensors
    import torch
    x = torch.from_numpy(x)
out = client.infer(x)
t1 = time.perf_counter()
client.close()
import sys
print(t1 - t0, "torch" in sys.modules)
"""


def bench_cold(bundle_dir: Path, repeats: int) -> dict[str, list[float]]:
    """Seconds from the first import to the first answer, in fresh processes, alternating."""
    out: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
    for _ in range(repeats):
        for runtime in out:
            code = COLD.format(bundle=str(bundle_dir), runtime=runtime)
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise SystemExit(f"cold start on {runtime} failed:\n{done.stderr[-2000:]}")
            seconds, torch_loaded = done.stdout.split()
            out[runtime].append(float(seconds))
            if runtime == "onnxruntime" and torch_loaded == "True":
                raise SystemExit("the edge on onnxruntime imported torch")
    return out


def bench_venvs(tmp: Path) -> dict[str, int]:
    """Installed bytes of a venv with splitinfer[edge] and of one with splitinfer[torch]."""
    sizes = {}
    torch_req = "torch==2.13.0"
    for name, extra in (("edge", "edge"), ("torch", "torch")):
        venv = tmp / f"venv-{name}"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "install", "--quiet"]
        if name == "torch":  # CPU torch first, as the Makefile and the Dockerfile do
            subprocess.run([*pip, torch_req], check=True)
        subprocess.run([*pip, f"{ROOT}[{extra}]"], check=True)
        check = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import splitinfer.edge, importlib.util as u; print(u.find_spec('torch') is not None)",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        if name == "edge" and check.stdout.strip() != "False":
            raise SystemExit("the [edge] venv has torch")
        # the venv's own pip and setuptools count in both alike
        sizes[name] = _du(venv)
        print(f"venv [{extra}]: {sizes[name] / 2**20:.0f} MiB", flush=True)
    return sizes


def bench_servers(bundle_dir: Path, args: argparse.Namespace) -> list:
    import bench_server

    for name in set(bench_server.CUTS) - {"mid", "late"}:
        del bench_server.CUTS[name]
    sargs = argparse.Namespace(
        quick=args.quick,
        concurrency=[1, 32] if args.quick else [1, 8, 32],
        seconds=1.5 if args.quick else 6.0,
        rounds=1 if args.quick else 4,
        warmup=0.5 if args.quick else 0.75,
        limit=20000,
        max_batch_size=16,
        delay_ms=2.0,
        compute_threads=None,
        torch_threads=None,
        inline_ms=0.0,
        lit_workers=os.cpu_count() or 1,
        lit_torch_threads=1,
        skip_litserve=bench_server._litserve_version() == "(not installed)",
        waker=False,
        bundle=bundle_dir,
        runtimes=["onnxruntime"],
        device="cpu",
    )
    return bench_server.bench(sargs)


def report(heads, cold, venvs, servers, args, compile_s: float) -> str:
    from _common import machine

    load = os.getloadavg()
    lines = [
        "# Runtime benchmark: ONNX Runtime against torch eager, EfficientNet-Lite0",
        "",
        f"Reproduce: `.venv/bin/python benchmarks/bench_runtime.py{' --quick' if args.quick else ''}`.",
        f"Machine: {machine()}; load average {load[0]:.1f} at the end on {os.cpu_count()} cores (shared "
        "with other work, so absolute numbers are noisy; the ratios come from the same run, interleaved).",
        "Compiling the bundle (torch segments + the ONNX export and its check at every cut) took "
        f"{compile_s:.0f} s.",
        "",
        "## Heads and the whole model (median ms per call; torch = the bundle's fused fx chain in eager)",
        "",
        "| range | threads | batch | torch ms | onnxruntime ms | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for what, threads, batch, row in heads:
        t, o = row["torch"], row["onnxruntime"]
        lines.append(f"| {what} | {threads} | {batch} | {t:.2f} | {o:.2f} | {t / o:.2f}x |")
    whole = [(t, b, r["torch"] / r["onnxruntime"]) for w, t, b, r in heads if w == "whole model"]
    lines += [
        "",
        "Target: the whole model on ONNX Runtime >= 3x torch eager at batch 1 and 8: "
        + ", ".join(
            f"{s:.2f}x at batch {b} ({t} thread{'s' if t != '1' else ''}) {'met' if s >= 3 else 'missed'}"
            for t, b, s in whole
        )
        + ".",
    ]
    if cold:
        lines += [
            "",
            "## Edge cold start (import + load bundle + first answer, fresh process, bundle on local disk)",
            "",
        ]
        lines += ["| runtime | median s | min s | runs |", "|---|---|---|---|"]
        for runtime, xs in cold.items():
            lines.append(f"| {runtime} | {statistics.median(xs):.2f} | {min(xs):.2f} | {len(xs)} |")
        o, t_cold = statistics.median(cold["onnxruntime"]), statistics.median(cold["torch"])
        lines += [
            "",
            f"Target: <= 1 s on ONNX Runtime: {o:.2f} s, {'met' if o <= 1 else 'missed'} "
            f"(torch: {t_cold:.2f} s, {t_cold / o:.1f}x as long).",
        ]
    if venvs:
        e, t = venvs["edge"], venvs["torch"]
        lines += [
            "",
            "## Installed size",
            "",
            "| venv | MiB |",
            "|---|---|",
            "| `pip install splitinfer[edge]` (numpy, onnxruntime, aiohttp, msgpack, zstandard, "
            f"prometheus-client; no torch) | {e / 2**20:.0f} |",
            f"| `pip install torch==2.13.0` (CPU) + `splitinfer[torch]` | {t / 2**20:.0f} |",
            "",
            f"Target: the [edge] venv <= 1/4 of the torch one: {e / t:.3f} of it, "
            f"{'met' if e * 4 <= t else 'missed'}.",
        ]
    if servers:
        lines += [
            "",
            "## Server: tails on each runtime against LitServe (benchmarks/bench_server.py's harness)",
            "",
            "| cut | C | server | req/s | p50 ms | p99 ms | vs LitServe req/s |",
            "|---|---|---|---|---|---|---|",
        ]
        by = {(r.server, r.cut, r.concurrency): r for r in servers}
        for r in servers:
            lit = by.get(("litserve", r.cut, r.concurrency))
            ratio = (
                f"{r.rps / lit.rps:.2f}x"
                if lit is not None and lit.rps > 0 and r.server != "litserve"
                else ""
            )
            lines.append(
                f"| {r.cut} | {r.concurrency} | {r.server} | {r.rps:.1f} | {r.p50_ms:.1f} "
                f"| {r.p99_ms:.1f} | {ratio} |"
            )
        ort, lit = by.get(("splitinfer onnxruntime", "mid", 32)), by.get(("litserve", "mid", 32))
        if ort is not None and lit is not None and lit.rps > 0:
            ok = ort.rps >= 2 * lit.rps and ort.p99_ms < lit.p99_ms
            lines += [
                "",
                f"Target: mid cut at C = 32 on ONNX Runtime >= 2x LitServe's throughput with a lower p99: "
                f"{ort.rps / lit.rps:.2f}x, p99 {ort.p99_ms:.0f} against {lit.p99_ms:.0f} ms, "
                f"{'met' if ok else 'missed'}.",
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--skip-venv", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE.parent / "results" / "runtime.md")
    args = parser.parse_args(argv)
    import torch
    from _common import efficientnet_lite0

    import splitinfer as si

    tmp = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    try:
        t0 = time.perf_counter()
        bundle = si.compile(efficientnet_lite0(), (torch.randn(1, 3, 224, 224),), name=MODEL)
        compile_s = time.perf_counter() - t0
        bundle_dir = bundle.save(tmp / MODEL)
        heads = bench_heads(bundle_dir, 10 if args.quick else 40)
        cold = bench_cold(bundle_dir, 1 if args.quick else 5)
        print("cold start:", cold, flush=True)
        venvs = {} if args.skip_venv else bench_venvs(tmp)
        servers = [] if args.skip_server else bench_servers(bundle_dir, args)
        text = report(heads, cold, venvs, servers, args, compile_s)
        args.out.write_text(text)
        print(text)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
