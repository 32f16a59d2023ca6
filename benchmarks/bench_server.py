"""Serving benchmark: the splitinfer tail server against LitServe, on EfficientNet-Lite0 tails.

Both servers serve the same tails of the same bundle with the same batch settings, on this
machine, in this run; one client (aiohttp, in its own process, 127.0.0.1 only, closed loop with
C concurrent requests, bounded by count and time) drives both. Two cuts:

- late: after the average pooling, the tail is one linear layer: serving overhead dominates;
- mid: after block 7, about two thirds of the model's compute stays in the tail.

Writes benchmarks/results/server.md. Run: `.venv/bin/python benchmarks/bench_server.py`
(a few minutes; `--quick` for a short smoke run). LitServe: `pip install litserve`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, machine

HERE = Path(__file__).resolve()
MODEL = "efficientnet-lite0"
CUTS = {k: v for k, v in {"late": 158, "mid": 77}.items() if k in os.environ.get("BENCH_CUTS", "late,mid").split(",")}
CODEC = "f32+zstd1"


# -- the client (runs in its own process) ----------------------------------------------------


async def _drive(
    url: str,
    bodies: list[bytes],
    content_type: str,
    concurrency: int,
    seconds: float,
    warmup: float,
    limit: int,
) -> dict[str, object]:
    import aiohttp

    from splitinfer.protocol import parse_server_timing

    headers = {"Content-Type": content_type}
    connector = aiohttp.TCPConnector(limit=concurrency)
    latencies: list[float] = []
    compute: list[float] = []
    total: list[float] = []
    errors: dict[str, int] = {}
    count = 0

    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(i: int, until: float, record: bool) -> None:
            nonlocal count
            k = i
            while time.perf_counter() < until and (not record or count < limit):
                if record:
                    count += 1
                body = bodies[k % len(bodies)]
                k += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as r:
                        await r.read()
                        status, timing = r.status, r.headers.get("Server-Timing")
                except aiohttp.ClientError as exc:
                    status, timing = type(exc).__name__, None
                if not record:
                    continue
                if status != 200:
                    errors[str(status)] = errors.get(str(status), 0) + 1
                    continue
                latencies.append(time.perf_counter() - t0)
                stages = parse_server_timing(timing)
                if "compute" in stages and "total" in stages:
                    compute.append(stages["compute"])
                    total.append(stages["total"])

        until = time.perf_counter() + warmup
        await asyncio.gather(*(worker(i, until, False) for i in range(concurrency)))
        t0 = time.perf_counter()
        until = t0 + seconds
        await asyncio.gather(*(worker(i, until, True) for i in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {
        "ok": len(latencies),
        "errors": errors,
        "elapsed": elapsed,
        "latencies": latencies,
        "compute": compute,
        "total": total,
    }


def client_main(args: argparse.Namespace) -> int:
    bodies = msgpack.unpackb(Path(args.bodies).read_bytes())
    result = asyncio.run(
        _drive(args.url, bodies, args.content_type, args.concurrency, args.seconds, args.warmup, args.limit)
    )
    print(json.dumps(result))
    return 0


# -- LitServe serving the same tail (runs in its own process) ---------------------------------


if os.environ.get("BENCH_SERVER_LITSERVE") == "1":  # LitServe's workers re-import this module
    import litserve as ls
    import torch

    from splitinfer import protocol
    from splitinfer.bundle import Bundle
    from splitinfer.compression import get_codec
    from splitinfer.tensors import specs_of

    class TailAPI(ls.LitAPI):
        """decode -> batch (concatenate) -> tail -> unbatch (split) -> encode, as splitinfer does."""

        def __init__(self, bundle_dir: str, torch_threads: int, **kwargs: object):
            super().__init__(**kwargs)
            self.bundle_dir, self.torch_threads = bundle_dir, torch_threads

        def setup(self, device: str) -> None:
            torch.set_num_threads(self.torch_threads)
            self.bundle = Bundle.load(self.bundle_dir)

        def decode_request(self, request: dict) -> tuple[protocol.RequestHeader, list[torch.Tensor]]:
            header, payload = protocol.decode_request(base64.b64decode(request["frame"]))
            if header.graph != self.bundle.graph_hash or header.codec not in self.bundle.codecs:
                raise ValueError("graph or codec mismatch")
            max_nbytes = sum(s.nbytes() for s in header.tensors)
            return header, get_codec(header.codec).decode(payload, max_nbytes=max_nbytes)

        def batch(self, inputs: list) -> tuple:
            headers = [h for h, _ in inputs]
            frontier = [torch.cat(parts, dim=0) for parts in zip(*(f for _, f in inputs))]
            return headers, frontier

        def predict(self, x: tuple) -> tuple:
            headers, frontier = x
            return headers, self.bundle.run_segments(headers[0].cut, self.bundle.n_segments, frontier)

        def unbatch(self, output: tuple) -> list:
            headers, outputs = output
            rows = [h.tensors[0].shape[0] for h in headers]
            pieces = [torch.split(o, rows, dim=0) for o in outputs]
            return [(h, [p[i] for p in pieces]) for i, h in enumerate(headers)]

        def encode_response(self, output: tuple) -> dict:
            header, outputs = output
            payload = get_codec("f32").encode(outputs)
            rheader = protocol.ResponseHeader(
                request_id=header.request_id,
                codec="f32",
                tensors=specs_of(outputs),
                payload_nbytes=len(payload),
            )
            return {"frame": base64.b64encode(protocol.encode_response(rheader, payload)).decode()}


def litserve_main(args: argparse.Namespace) -> int:
    api = TailAPI(
        args.bundle,
        args.torch_threads,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.delay_ms / 1000.0,
    )
    server = ls.LitServer(
        api, accelerator="cpu", workers_per_device=args.workers, fast_queue=True, timeout=60
    )
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)
    return 0


# -- orchestration --------------------------------------------------------------------------


@dataclass
class Result:
    server: str
    cut: str
    concurrency: int
    ok: int
    errors: dict[str, int]
    rps: float
    p50_ms: float
    p99_ms: float
    #: Median client latency minus the server's compute (ms), and server total minus compute.
    overhead_client_ms: float | None
    overhead_server_ms: float | None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready ({url})")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"server at {url} not ready within {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _popen(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopping it stops LitServe's workers too
        env={**os.environ, **(env or {})},
    )


def _bodies(bundle_dir: Path, cut: int, n: int) -> tuple[list[bytes], list[bytes]]:
    import torch

    from splitinfer import protocol
    from splitinfer.bundle import Bundle
    from splitinfer.compression import get_codec
    from splitinfer.tensors import specs_of

    bundle = Bundle.load(bundle_dir, upto_cut=cut)
    frames, jsons = [], []
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        frontier = bundle.head(cut, torch.randn(1, 3, 224, 224, generator=gen))
        payload = get_codec(CODEC).encode(frontier)
        header = protocol.RequestHeader(
            model=MODEL,
            graph=bundle.graph_hash,
            cut=cut,
            codec=CODEC,
            tensors=specs_of(frontier),
            request_id=f"bench-{i}",
            payload_nbytes=len(payload),
        )
        frame = protocol.encode_request(header, payload)
        frames.append(frame)
        jsons.append(json.dumps({"frame": base64.b64encode(frame).decode()}).encode())
    return frames, jsons


def _run_client(
    url: str, bodies: Path, content_type: str, concurrency: int, seconds: float, warmup: float, limit: int
) -> dict:
    cmd = [
        sys.executable,
        str(HERE),
        "client",
        url,
        str(bodies),
        "--content-type",
        content_type,
        "--concurrency",
        str(concurrency),
        "--seconds",
        str(seconds),
        "--warmup",
        str(warmup),
        "--limit",
        str(limit),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup + 120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summarize(server: str, cut: str, concurrency: int, raw: dict) -> Result:
    lat = sorted(raw["latencies"])
    n = len(lat)
    p50 = lat[n // 2] * 1000 if n else float("nan")
    p99 = lat[min(n - 1, int(n * 0.99))] * 1000 if n else float("nan")
    over_client = over_server = None
    if raw["compute"]:
        over_client = (statistics.median(lat) - statistics.median(raw["compute"])) * 1000
        over_server = statistics.median(t - c for t, c in zip(raw["total"], raw["compute"])) * 1000
    return Result(
        server, cut, concurrency, n, raw["errors"], n / raw["elapsed"], p50, p99, over_client, over_server
    )


def bench(args: argparse.Namespace) -> list[Result]:
    import torch
    from _common import efficientnet_lite0

    import splitinfer as si

    tmp = Path(tempfile.mkdtemp(prefix="bench-server-"))
    procs: list[subprocess.Popen] = []
    try:
        repo = tmp / "repo"
        print("compiling EfficientNet-Lite0 ...", flush=True)
        bundle = si.compile(efficientnet_lite0(), (torch.randn(1, 3, 224, 224),), name=MODEL)
        bundle.save(repo / MODEL)
        files: dict[str, tuple[Path, Path]] = {}
        for name, cut in CUTS.items():
            frames, jsons = _bodies(repo / MODEL, cut, 8)
            files[name] = (tmp / f"{name}.frames", tmp / f"{name}.json")
            files[name][0].write_bytes(msgpack.packb(frames))
            files[name][1].write_bytes(msgpack.packb(jsons))
            print(
                f"cut {name} ({cut}: {bundle.cuts[cut].name}): request body {len(frames[0])} bytes",
                flush=True,
            )

        ours_port, lit_port = _free_port(), _free_port()
        ours = _popen(
            [
                sys.executable,
                "-m",
                "splitinfer",
                "serve",
                "--repository",
                str(repo),
                "--port",
                str(ours_port),
                "--max-batch-size",
                str(args.max_batch_size),
                "--max-queue-delay-ms",
                str(args.delay_ms),
                "--compute-threads",
                str(args.compute_threads),
                "--torch-threads",
                str(args.torch_threads),
                "--max-queue-length",
                "1024",
                "--log-level",
                "WARNING",
            ],
            tmp / "ours.log",
        )
        procs.append(ours)
        servers = {"splitinfer": (f"http://127.0.0.1:{ours_port}", "/v1/models/" + MODEL + "/infer")}
        _wait_ready(f"http://127.0.0.1:{ours_port}/v2/health/ready", ours)
        if not args.skip_litserve:
            lit = _popen(
                [
                    sys.executable,
                    str(HERE),
                    "litserve",
                    str(repo / MODEL),
                    "--port",
                    str(lit_port),
                    "--max-batch-size",
                    str(args.max_batch_size),
                    "--delay-ms",
                    str(args.delay_ms),
                    "--workers",
                    str(args.lit_workers),
                    "--torch-threads",
                    str(args.lit_torch_threads),
                ],
                tmp / "litserve.log",
                env={"BENCH_SERVER_LITSERVE": "1"},
            )
            procs.append(lit)
            servers["litserve"] = (f"http://127.0.0.1:{lit_port}", "/predict")
            _wait_ready(f"http://127.0.0.1:{lit_port}/health", lit)

        results = []
        order = list(servers)
        for cut in CUTS:
            for concurrency in args.concurrency:
                order.reverse()  # alternate who goes first, so drift hits both alike
                for server in order:
                    base, path = servers[server]
                    frames, jsons = files[cut]
                    body, ctype = (frames, "application/vnd.splitinfer.frame+msgpack")
                    if server == "litserve":
                        body, ctype = (jsons, "application/json")
                    raw = _run_client(
                        base + path, body, ctype, concurrency, args.seconds, args.warmup, args.limit
                    )
                    res = _summarize(server, cut, concurrency, raw)
                    results.append(res)
                    print(
                        f"{cut:>4} c={concurrency:<3} {server:<10} {res.rps:8.1f} req/s  p50 {res.p50_ms:7.2f} ms"
                        f"  p99 {res.p99_ms:7.2f} ms  errors {res.errors or 0}",
                        flush=True,
                    )
        return results
    finally:
        for proc in procs:
            _stop(proc)
        for log in tmp.glob("*.log"):
            text = log.read_text(errors="replace")
            if re.search(r"Traceback|ERROR", text):
                print(f"--- {log.name} (last lines)\n" + "\n".join(text.splitlines()[-15:]), file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


def _cell(results: list[Result], server: str, cut: str, c: int) -> Result | None:
    return next((r for r in results if (r.server, r.cut, r.concurrency) == (server, cut, c)), None)


def report(results: list[Result], args: argparse.Namespace) -> str:
    has_lit = any(r.server == "litserve" for r in results)
    lines = [
        "# Server benchmark: EfficientNet-Lite0 tails, splitinfer against LitServe",
        "",
        f"Reproduce: `.venv/bin/python benchmarks/bench_server.py{' --quick' if args.quick else ''}`.",
        f"Machine: {machine()}. Shared with other work and noisy: the two servers are measured in",
        "the same run, alternating which goes first at each point.",
        "",
        "Setup:",
        "",
        f"- cuts: late = {CUTS['late']} (after `_avg_pooling`, tail = one linear layer); mid = "
        f"{CUTS['mid']} (after `_blocks.7`); request codec `{CODEC}`, response `f32`, batch 1 per request;",
        f"- same batch settings for both: at most {args.max_batch_size} per batch, "
        f"{args.delay_ms:g} ms queue delay;",
        f"- splitinfer: `splitinfer serve --compute-threads {args.compute_threads} --torch-threads "
        f"{args.torch_threads}` (one process, asyncio event loop, aiohttp);",
        f"- LitServe {_litserve_version()}: as its docs recommend for throughput: `fast_queue=True` (ZeroMQ), "
        f"`workers_per_device={args.lit_workers}` (= cores, for CPU), `num_api_servers` left at its "
        f"default (= inference workers), batching via `LitAPI(max_batch_size, batch_timeout)`, uvicorn "
        f"with uvloop and httptools, log level warning; torch threads per worker {args.lit_torch_threads}."
        ' Its API takes JSON, so the same frame travels base64-encoded in `{"frame": ...}`;',
        f"- client: aiohttp in a separate process, closed loop, {args.warmup:g} s warm-up then "
        f"{args.seconds:g} s or {args.limit} requests, 127.0.0.1.",
        "",
        "| cut | concurrency | server | req/s | p50 ms | p99 ms | errors | req/s vs LitServe | p99 vs LitServe |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for cut in CUTS:
        for c in args.concurrency:
            lit = _cell(results, "litserve", cut, c)
            for server in ("splitinfer", "litserve"):
                r = _cell(results, server, cut, c)
                if r is None:
                    continue
                ratio = p99 = ""
                if server == "splitinfer" and lit is not None and lit.rps > 0:
                    ratio, p99 = f"{r.rps / lit.rps:.2f}x", f"{r.p99_ms / lit.p99_ms:.2f}x"
                errors = sum(r.errors.values())
                lines.append(
                    f"| {cut} | {c} | {server} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {errors} "
                    f"| {ratio} | {p99} |"
                )
    lines += ["", "Targets:", ""]
    lines += _verdicts(results, has_lit)
    return "\n".join(lines) + "\n"


def _verdicts(results: list[Result], has_lit: bool) -> list[str]:
    out = []
    ours32, lit32 = _cell(results, "splitinfer", "late", 32), _cell(results, "litserve", "late", 32)
    if has_lit and ours32 and lit32:
        ratio = ours32.rps / lit32.rps
        met = ratio >= 1.5 and ours32.p99_ms < lit32.p99_ms
        out.append(
            f"- late cut, concurrency 32: at least 1.5x LitServe's throughput with a lower p99: "
            f"**{'met' if met else 'missed'}** ({ratio:.2f}x throughput; p99 {ours32.p99_ms:.2f} ms "
            f"against {lit32.p99_ms:.2f} ms)."
        )
    if has_lit:
        worst = None
        for c in sorted({r.concurrency for r in results}):
            o, lt = _cell(results, "splitinfer", "mid", c), _cell(results, "litserve", "mid", c)
            if o and lt:
                ratio = o.rps / lt.rps
                worst = ratio if worst is None else min(worst, ratio)
        if worst is not None:
            out.append(
                f"- mid cut: no worse than LitServe: **{'met' if worst >= 0.95 else 'missed'}** "
                f"(lowest throughput ratio over the concurrencies {worst:.2f}x; 0.95x counted as equal "
                "within this machine's noise)."
            )
    one = _cell(results, "splitinfer", "late", 1)
    if one and one.overhead_server_ms is not None:
        met = one.overhead_server_ms <= 1.0
        out.append(
            f"- server overhead at concurrency 1 (late cut) at most 1 ms: **{'met' if met else 'missed'}** "
            f"(server total minus compute, median {one.overhead_server_ms:.3f} ms; client-observed "
            f"latency minus compute, which adds the HTTP round trip and the client, "
            f"{one.overhead_client_ms:.3f} ms)."
        )
    mid1 = _cell(results, "splitinfer", "mid", 1)
    if mid1 and mid1.overhead_server_ms is not None:
        out.append(
            f"- for reference, mid cut at concurrency 1: server total minus compute "
            f"{mid1.overhead_server_ms:.3f} ms (the frame is larger: decode costs more)."
        )
    return out


def _litserve_version() -> str:
    try:
        from importlib.metadata import version

        return version("litserve")
    except Exception:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode")
    c = sub.add_parser("client", help="(internal) drive one server")
    c.add_argument("url")
    c.add_argument("bodies")
    c.add_argument("--content-type", required=True)
    c.add_argument("--concurrency", type=int, required=True)
    c.add_argument("--seconds", type=float, required=True)
    c.add_argument("--warmup", type=float, required=True)
    c.add_argument("--limit", type=int, required=True)
    lit = sub.add_parser("litserve", help="(internal) run LitServe on a bundle's tail")
    lit.add_argument("bundle")
    lit.add_argument("--port", type=int, required=True)
    lit.add_argument("--max-batch-size", type=int, required=True)
    lit.add_argument("--delay-ms", type=float, required=True)
    lit.add_argument("--workers", type=int, required=True)
    lit.add_argument("--torch-threads", type=int, required=True)
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64]
    )
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds per point")
    parser.add_argument("--limit", type=int, default=20000, help="most requests per point")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--delay-ms", type=float, default=2.0)
    parser.add_argument("--compute-threads", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--lit-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--lit-torch-threads", type=int, default=1)
    parser.add_argument("--skip-litserve", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "server.md")
    args = parser.parse_args(argv)
    if args.mode == "client":
        return client_main(args)
    if args.mode == "litserve":
        return litserve_main(args)
    args.seconds = args.seconds or (2.0 if args.quick else 6.0)
    args.warmup = args.warmup or (0.5 if args.quick else 1.5)
    if not args.skip_litserve and _litserve_version() == "(not installed)":
        print("LitServe is not installed (pip install litserve); measuring splitinfer alone", file=sys.stderr)
        args.skip_litserve = True
    results = bench(args)
    text = report(results, args)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
