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
(about fifteen minutes; `--quick` for a smoke run; `--parts heads,cold` runs some parts and keeps
the other parts' sections of the existing file, so that each run stays short; `--skip-server`,
`--skip-venv` leave parts out).
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

MODEL = "efficientnet-lite0"


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def plain_export(model) -> bytes:
    """The issue's reference: the whole model exported as a user would, without splitinfer
    (``torch.export`` with a dynamic batch, example batch 2, then ``torch.onnx.export(program,
    dynamo=True)`` with the exporter's optimizer on)."""
    import contextlib
    import io
    import warnings

    import torch

    x = torch.randn(2, 3, 224, 224)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.export.export(model.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("b", min=1)},))
        onnx_program = torch.onnx.export(program, (x,), dynamo=True, verbose=False)
    assert onnx_program is not None
    return onnx_program.model_proto.SerializeToString()


def bench_heads(bundle_dir: Path, repeats: int, plain: bytes) -> list[tuple[str, str, int, dict[str, float]]]:
    """(what, threads, batch, {runtime: median ms}) for heads of several cuts and the whole model
    (and, for the whole model, the plain export of :func:`plain_export`, in the same loop)."""
    import onnxruntime as ort
    import torch
    from _common import interleaved, median_ms

    import splitinfer as si
    from splitinfer.runtime import session_options

    rows = []
    cores = os.cpu_count() or 1
    tb = si.Bundle.load(bundle_dir)
    last = tb.last_cut
    cuts = [c for c in (20, 77, 120, last) if c <= last]
    for threads in (1, cores):
        torch.set_num_threads(threads)
        ob = si.Bundle.load(bundle_dir, runtime="onnxruntime", threads=threads)
        ref = ort.InferenceSession(plain, session_options(threads), providers=["CPUExecutionProvider"])
        ref_input = ref.get_inputs()[0].name
        for batch in (1, 8):
            x = torch.rand(batch, 3, 224, 224)
            xn = x.numpy()
            for k in cuts if batch == 1 else [last]:
                what = "whole model" if k == last else f"head({k}) {tb.cuts[k].name}"
                fns = {
                    "torch": lambda k=k, x=x: tb.head(k, x),
                    "onnxruntime": lambda k=k, xn=xn, ob=ob: ob.head(k, xn),
                }
                if k == last:
                    fns["plain"] = lambda xn=xn, ref=ref, name=ref_input: ref.run(None, {name: xn})
                times = interleaved(fns, repeats)
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


def bench_servers(bundle_dir: Path, args: argparse.Namespace, cut: str) -> list:
    import bench_server

    for name in set(bench_server.CUTS) - {cut}:
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


#: The parts, each a section of the report of its own (``--parts`` runs some, keeping the others).
PARTS = ("heads", "cold", "venv", "server-mid", "server-late")


def _when() -> str:
    load = os.getloadavg()
    return (
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min) at the end of this part, "
        f"on {os.cpu_count()} cores shared with other work."
    )


def section_heads(heads) -> list[str]:
    lines = [
        "## Heads and the whole model (median ms per call; torch = the bundle's fused fx chain in eager)",
        "",
        _when(),
        "",
        "The plain export is the issue's reference: the whole model through `torch.export` (dynamic "
        "batch) and `torch.onnx.export(program, dynamo=True)` with the exporter's optimizer, outside "
        "splitinfer, one ONNX Runtime session with the same options, timed in the same loop.",
        "",
        "| range | threads | batch | torch ms | onnxruntime ms | speed-up | plain export ms "
        "| bundle / plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for what, threads, batch, row in heads:
        t, o = row["torch"], row["onnxruntime"]
        ref = f"{row['plain']:.2f} | {o / row['plain']:.2f}" if "plain" in row else " | "
        lines.append(f"| {what} | {threads} | {batch} | {t:.2f} | {o:.2f} | {t / o:.2f}x | {ref} |")
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
    return lines


def section_cold(cold) -> list[str]:
    lines = [
        "## Edge cold start (import + load bundle + first answer, fresh process, bundle on local disk)",
        "",
        _when(),
        "",
        "| runtime | median s | min s | runs |",
        "|---|---|---|---|",
    ]
    for runtime, xs in cold.items():
        lines.append(f"| {runtime} | {statistics.median(xs):.2f} | {min(xs):.2f} | {len(xs)} |")
    o, t_cold = statistics.median(cold["onnxruntime"]), statistics.median(cold["torch"])
    lines += [
        "",
        f"Target: <= 1 s on ONNX Runtime: {o:.2f} s, {'met' if o <= 1 else 'missed'} "
        f"(torch: {t_cold:.2f} s, {t_cold / o:.1f}x as long).",
    ]
    return lines


def section_venv(venvs) -> list[str]:
    e, t = venvs["edge"], venvs["torch"]
    return [
        "## Installed size",
        "",
        _when(),
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


def section_server(cut: str, servers) -> list[str]:
    lines = [
        f"## Server: {cut} cut, tails on each runtime against LitServe (bench_server.py's harness)",
        "",
        _when(),
        "",
        "| cut | C | server | req/s | p50 ms | p99 ms | vs LitServe req/s |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {(r.server, r.cut, r.concurrency): r for r in servers}
    if not any(r.server == "litserve" for r in servers):
        lines.insert(3, "LitServe is not installed here (`pip install -e '.[bench]'`): not measured.\n")
    for r in servers:
        lit = by.get(("litserve", r.cut, r.concurrency))
        vs = lit is not None and lit.rps > 0 and r.server != "litserve"
        ratio = f"{r.rps / lit.rps:.2f}x" if vs else ""
        lines.append(
            f"| {r.cut} | {r.concurrency} | {r.server} | {r.rps:.1f} | {r.p50_ms:.1f} "
            f"| {r.p99_ms:.1f} | {ratio} |"
        )
    ort, lit = by.get(("splitinfer onnxruntime", cut, 32)), by.get(("litserve", cut, 32))
    if cut == "mid" and ort is not None and lit is not None and lit.rps > 0:
        ok = ort.rps >= 2 * lit.rps and ort.p99_ms < lit.p99_ms
        lines += [
            "",
            f"Target: mid cut at C = 32 on ONNX Runtime >= 2x LitServe's throughput with a lower p99: "
            f"{ort.rps / lit.rps:.2f}x, p99 {ort.p99_ms:.0f} against {lit.p99_ms:.0f} ms, "
            f"{'met' if ok else 'missed'}.",
        ]
    return lines


HEADER = "# Runtime benchmark: ONNX Runtime against torch eager, EfficientNet-Lite0"
#: Everything after this line of the report is written by hand and kept as it is.
NOTES = "<!-- notes: kept as written -->\n"


def report(sections: dict[str, list[str]], args: argparse.Namespace, compile_s: float, previous: str) -> str:
    """The report: this run's sections, and the other parts' sections kept from ``previous``
    (each part's ratios come from its own run, interleaved; each section says when and under
    what load it was measured)."""
    from _common import machine

    kept: dict[str, str] = {}
    previous, _, notes = previous.partition(NOTES)
    if previous.startswith(HEADER):
        for chunk in previous.split("\n<!-- part: ")[1:]:
            name, _, body = chunk.partition(" -->\n")
            kept[name] = body.rstrip("\n")
    lines = [
        HEADER,
        "",
        "Reproduce: `.venv/bin/python benchmarks/bench_runtime.py` (all parts; `--parts heads,cold` "
        "runs some and keeps the others' sections).",
        f"Machine: {machine()}. Absolute numbers are noisy on this shared machine; every ratio "
        "comes from one part's run, interleaved (see each part's load average).",
        "Compiling the bundle (torch segments + the ONNX export and its check at every cut) took "
        f"{compile_s:.0f} s in the last run.",
    ]
    for name in PARTS:
        body = "\n".join(sections[name]) if name in sections else kept.get(name)
        if body is not None:
            lines += ["", f"<!-- part: {name} -->", body]
    text = "\n".join(lines) + "\n"
    return text + "\n" + NOTES + notes if notes else text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, of {', '.join(PARTS)}; the report keeps the other parts' "
        "sections from the existing --out file (default: all)",
    )
    parser.add_argument("--skip-server", action="store_true", help="leave out server-mid and server-late")
    parser.add_argument("--skip-venv", action="store_true", help="leave out venv")
    parser.add_argument("--out", type=Path, default=HERE.parent / "results" / "runtime.md")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}: choose from {', '.join(PARTS)}")
    parts = [
        p
        for p in parts
        if not (args.skip_server and p.startswith("server")) and not (args.skip_venv and p == "venv")
    ]
    import torch
    from _common import efficientnet_lite0

    import splitinfer as si

    tmp = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    try:
        t0 = time.perf_counter()
        bundle = si.compile(efficientnet_lite0(), (torch.randn(1, 3, 224, 224),), name=MODEL)
        compile_s = time.perf_counter() - t0
        bundle_dir = bundle.save(tmp / MODEL)
        sections: dict[str, list[str]] = {}
        if "heads" in parts:
            plain = plain_export(efficientnet_lite0())
            sections["heads"] = section_heads(bench_heads(bundle_dir, 10 if args.quick else 40, plain))
        if "cold" in parts:
            cold = bench_cold(bundle_dir, 1 if args.quick else 5)
            print("cold start:", cold, flush=True)
            sections["cold"] = section_cold(cold)
        if "venv" in parts:
            sections["venv"] = section_venv(bench_venvs(tmp))
        for cut in ("mid", "late"):
            if f"server-{cut}" in parts:
                sections[f"server-{cut}"] = section_server(cut, bench_servers(bundle_dir, args, cut))
        previous = args.out.read_text() if args.out.exists() else ""
        text = report(sections, args, compile_s, previous)
        args.out.write_text(text)
        print(text)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
