"""Serving benchmark: the splitinfer tail server against LitServe, on EfficientNet-Lite0 tails.

Both servers serve the same tails of the same bundle with the same batch settings, on this
machine, in this run; one client (aiohttp, in its own process, 127.0.0.1 only, closed loop with
C concurrent requests, bounded by count and time) drives both. Two cuts:

- late: after the average pooling, the tail is one linear layer: serving overhead dominates;
- mid: after block 7, about two thirds of the model's compute stays in the tail.

Every point is measured in rounds: each round gives every server a slice of the time, in an
order that rotates, so that the load of other work on the machine hits all servers alike.
During a server's slice the other servers are paused (SIGSTOP), so that none pays for another's
idle work (an idle LitServe polls its queues, about a fifth of a core here). Besides latency and
throughput, each slice records the CPU time the server's processes spent per request, which
the load of other work on a shared machine changes far less than it changes throughput.

Writes benchmarks/results/server.md. Run: `.venv/bin/python benchmarks/bench_server.py`
(a few minutes; `--quick` for a short smoke run). LitServe: `pip install -e '.[bench]'`.
`--device cuda` (or `cuda:N`) runs both servers' tails on a GPU (splitinfer with `serve --device`,
LitServe with `accelerator="cuda"`) and writes benchmarks/results/server-cuda.md; it needs a
CUDA build of torch and a GPU, which the machine that wrote server.md does not have.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

HERE = Path(__file__).resolve()

MODEL = "efficientnet-lite0"
CUT_INDEX = {"late": 158, "mid": 77}
CUTS = dict(CUT_INDEX)  # the cuts measured in this run (--cuts)
CODEC = "f32+zstd1"
FRAME_TYPE = "application/vnd.splitinfer.frame+msgpack"
WAKER = "import time\nwhile True:\n    time.sleep(0.0005)"
WAKER_NAME = "splitinfer + waker"


# -- the client (runs in its own process; imports neither torch nor splitinfer) -----------


def _server_timing(value: str | None) -> dict[str, float]:
    stages = {}
    for entry in (value or "").split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, val = param.strip().partition("=")
            if key == "dur":
                with contextlib.suppress(ValueError):
                    stages[name] = float(val) / 1000.0
    return stages


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

    headers = {"Content-Type": content_type}
    latencies: list[float] = []
    compute: list[float] = []
    total: list[float] = []
    errors: dict[str, int] = {}
    count = warm = 0

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker(i: int, until: float, record: bool) -> None:
            nonlocal count, warm
            k = i
            while time.perf_counter() < until and (not record or count < limit):
                count += record
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
                    warm += 1
                    continue
                if status != 200:
                    errors[str(status)] = errors.get(str(status), 0) + 1
                    continue
                latencies.append(time.perf_counter() - t0)
                stages = _server_timing(timing)
                if "compute" in stages and "total" in stages:
                    compute.append(stages["compute"])
                    total.append(stages["total"])

        until = time.perf_counter() + warmup
        await asyncio.gather(*(worker(i, until, False) for i in range(concurrency)))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i, t0 + seconds, True) for i in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {
        **{"elapsed": elapsed, "errors": errors, "latencies": latencies, "compute": compute, "total": total},
        "warmup_requests": warm,
    }


def client_main(args: argparse.Namespace) -> int:
    bodies = msgpack.unpackb(Path(args.bodies).read_bytes())
    result = asyncio.run(
        _drive(args.url, bodies, args.content_type, args.concurrency, args.seconds, args.warmup, args.limit)
    )
    print(json.dumps(result))
    return 0


# -- LitServe serving the same tail (runs in its own processes) ------------------------------


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
            self.device = torch.device(device)
            self.bundle = Bundle.load(self.bundle_dir, device=self.device)

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
            frontier = [t.to(self.device) for t in frontier]
            outputs = self.bundle.run_segments(headers[0].cut, self.bundle.n_segments, frontier)
            return headers, [o.to("cpu") for o in outputs]  # encoded on the host, as splitinfer does

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
    accelerator = "cuda" if args.device.startswith("cuda") else "cpu"
    server = ls.LitServer(
        api, accelerator=accelerator, workers_per_device=args.workers, fast_queue=True, timeout=60
    )
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)
    return 0


# -- orchestration --------------------------------------------------------------------------


@dataclass
class Server:
    """One server under test: how to start it and how to talk to it."""

    name: str
    command: list[str]
    ready_path: str
    infer_path: str
    json_body: bool
    cuts: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


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
    #: Median client latency minus the server's compute (ms), and median server total minus compute.
    overhead_client_ms: float | None
    overhead_server_ms: float | None
    #: CPU time of the server's processes per request (ms), over all its slices.
    cpu_ms: float | None = None
    #: Requests per second in each round (the rounds line up across servers).
    round_rps: list[float] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(server: Server, log: Path) -> None:
    server.port = _free_port()
    cmd = [c.replace("{port}", str(server.port)) for c in server.command]
    server.proc = subprocess.Popen(
        cmd,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopping it stops LitServe's workers too
        env={**os.environ, **server.env},
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}; see {log}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(server.base + server.ready_path, timeout=2) as r,
        ):
            if r.status == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{server.name} not ready within 240 s")


def _pause(server: Server, paused: bool) -> None:
    """Stop (SIGSTOP) or resume (SIGCONT) every process of an idle server."""
    if server.proc is not None and server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)


def _stop(server: Server) -> None:
    proc = server.proc
    if proc is None or proc.poll() is not None:
        return
    _pause(server, False)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) of the live processes in process group ``pgid``."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # pgrp; utime and stime follow at 11 and 12
                ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


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


def _slice(server: Server, bodies: Path, concurrency: int, seconds: float, args: argparse.Namespace) -> dict:
    cmd = [
        *(sys.executable, str(HERE), "client", server.base + server.infer_path, str(bodies)),
        *("--content-type", "application/json" if server.json_body else FRAME_TYPE),
        *("--concurrency", str(concurrency), "--seconds", str(seconds), "--warmup", str(args.warmup)),
        *("--limit", str(args.limit)),
    ]
    assert server.proc is not None
    cpu0 = _cpu_seconds(server.proc.pid)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + args.warmup + 120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # The server's CPU over warm-up and measurement, per request answered in either.
    done = len(result["latencies"]) + sum(result["errors"].values()) + result["warmup_requests"]
    result["cpu_per_request"] = (_cpu_seconds(server.proc.pid) - cpu0) / done if done else None
    return result


def _summarize(server: str, cut: str, concurrency: int, slices: list[dict]) -> Result:
    lat = sorted(x for s in slices for x in s["latencies"])
    compute = [x for s in slices for x in s["compute"]]
    total = [x for s in slices for x in s["total"]]
    errors: dict[str, int] = {}
    for s in slices:
        for k, v in s["errors"].items():
            errors[k] = errors.get(k, 0) + v
    n = len(lat)
    p50 = lat[n // 2] * 1000 if n else float("nan")
    p99 = lat[min(n - 1, int(n * 0.99))] * 1000 if n else float("nan")
    over_client = over_server = None
    if compute:
        over_client = (statistics.median(lat) - statistics.median(compute)) * 1000
        over_server = statistics.median(t - c for t, c in zip(total, compute)) * 1000
    elapsed = sum(s["elapsed"] for s in slices)
    cpus = [s["cpu_per_request"] for s in slices if s.get("cpu_per_request")]
    cpu_ms = statistics.median(cpus) * 1000 if cpus else None
    rounds = [len(s["latencies"]) / s["elapsed"] for s in slices]
    return Result(
        server, cut, concurrency, n, errors, n / elapsed, p50, p99, over_client, over_server, cpu_ms, rounds
    )


def _servers(args: argparse.Namespace, repo: Path) -> list[Server]:
    serve = [
        *(sys.executable, "-m", "splitinfer", "serve", "--repository", str(repo), "--port", "{port}"),
        *("--max-batch-size", str(args.max_batch_size), "--max-queue-delay-ms", str(args.delay_ms)),
        *("--max-queue-length", "1024", "--log-level", "WARNING", "--device", args.device),
    ]
    if args.compute_threads is not None:
        serve += ["--compute-threads", str(args.compute_threads)]
    if args.torch_threads is not None:
        serve += ["--torch-threads", str(args.torch_threads)]
    infer = f"/v1/models/{MODEL}/infer"
    servers = [Server("splitinfer", serve, "/v2/health/ready", infer, False, tuple(CUTS))]
    for runtime in getattr(args, "runtimes", ()):  # bench_runtime.py: the same server on another runtime
        on = [*serve, "--runtime", runtime]
        servers.append(Server(f"splitinfer {runtime}", on, "/v2/health/ready", infer, False, tuple(CUTS)))
    if args.inline_ms > 0:
        inline = [*serve, "--inline-below-ms", str(args.inline_ms)]
        servers.append(Server("splitinfer inline", inline, "/v2/health/ready", infer, False, ("late",)))
    if args.waker and "mid" in CUTS:
        # The control experiment (see the notes of the report): the same server, plus a process in
        # its session that does nothing but wake up every 0.5 ms, as LitServe's pollers do.
        waker = shlex.join([sys.executable, "-c", WAKER])
        waking = ["/bin/sh", "-c", f"{waker} & exec {shlex.join(serve)}"]
        servers.append(Server(WAKER_NAME, waking, "/v2/health/ready", infer, False, ("mid",)))
    if not args.skip_litserve:
        lit = [
            *(sys.executable, str(HERE), "litserve", str(repo / MODEL), "--port", "{port}"),
            *("--max-batch-size", str(args.max_batch_size), "--delay-ms", str(args.delay_ms)),
            *("--workers", str(args.lit_workers), "--torch-threads", str(args.lit_torch_threads)),
            *("--device", args.device),
        ]
        servers.append(
            Server("litserve", lit, "/health", "/predict", True, tuple(CUTS), {"BENCH_SERVER_LITSERVE": "1"})
        )
    return servers


def bench(args: argparse.Namespace) -> list[Result]:
    import torch
    from _common import efficientnet_lite0

    import splitinfer as si

    tmp = Path(tempfile.mkdtemp(prefix="bench-server-"))
    servers: list[Server] = []
    try:
        repo = tmp / "repo"
        if args.bundle is not None:
            shutil.copytree(args.bundle, repo / MODEL)
            bundle = si.Bundle.load(repo / MODEL, upto_cut=0)
            if bundle.name != MODEL:
                raise SystemExit(f"--bundle {args.bundle} holds {bundle.name!r}, not {MODEL!r}")
        else:
            print("compiling EfficientNet-Lite0 ...", flush=True)
            bundle = si.compile(efficientnet_lite0(), (torch.randn(1, 3, 224, 224),), name=MODEL)
            bundle.save(repo / MODEL)
        files: dict[str, tuple[Path, Path]] = {}
        for name, cut in CUTS.items():
            frames, jsons = _bodies(repo / MODEL, cut, 8)
            files[name] = (tmp / f"{name}.frames", tmp / f"{name}.json")
            files[name][0].write_bytes(msgpack.packb(frames))
            files[name][1].write_bytes(msgpack.packb(jsons))
            print(f"cut {name} = {cut} ({bundle.cuts[cut].name}): frame {len(frames[0])} bytes", flush=True)
        servers = _servers(args, repo)
        for server in servers:
            print(f"starting {server.name} ...", flush=True)
            _start(server, tmp / f"{server.name.replace(' ', '-')}.log")
            _pause(server, True)  # resumed for its own slices only
        results = []
        for cut in CUTS:
            for concurrency in args.concurrency:
                taking = [s for s in servers if cut in s.cuts]
                slices: dict[str, list[dict]] = {s.name: [] for s in taking}
                for r in range(args.rounds):
                    for server in taking[r % len(taking) :] + taking[: r % len(taking)]:
                        body = files[cut][1 if server.json_body else 0]
                        _pause(server, False)
                        try:
                            slices[server.name].append(
                                _slice(server, body, concurrency, args.seconds / args.rounds, args)
                            )
                        finally:
                            _pause(server, True)
                for server in taking:
                    res = _summarize(server.name, cut, concurrency, slices[server.name])
                    results.append(res)
                    print(
                        f"{cut:>4} c={concurrency:<3} {server.name:<18} {res.rps:8.1f} req/s "
                        f"p50 {res.p50_ms:7.2f} ms p99 {res.p99_ms:7.2f} ms errors {res.errors or 0}",
                        flush=True,
                    )
        return results
    finally:
        for server in servers:
            _stop(server)
        for log in tmp.glob("*.log"):
            text = log.read_text(errors="replace")
            if re.search(r"Traceback|ERROR", text):
                print(f"--- {log.name} (last lines)\n" + "\n".join(text.splitlines()[-15:]), file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


def _cell(results: list[Result], server: str, cut: str, c: int) -> Result | None:
    return next((r for r in results if (r.server, r.cut, r.concurrency) == (server, cut, c)), None)


def report(results: list[Result], args: argparse.Namespace, load: tuple[float, float]) -> str:
    from _common import machine

    names = list(dict.fromkeys(r.server for r in results))
    lines = [
        "# Server benchmark: EfficientNet-Lite0 tails, splitinfer against LitServe",
        "",
        f"Reproduce: `.venv/bin/python benchmarks/bench_server.py{' --quick' if args.quick else ''}`.",
        f"Machine: {machine()}. The machine is shared with other work (load average {load[0]:.1f} at the "
        f"start, {load[1]:.1f} at the end on {os.cpu_count()} cores), so absolute numbers are noisy; "
        f"every point is measured in {args.rounds} rounds in which each server gets a slice of the time, "
        "in rotating order, so that the ratios compare like with like; during a server's slice the other "
        "servers are paused (SIGSTOP). The spread of the throughput ratio over the rounds is in brackets; "
        "`CPU ms/req` is the CPU time (user + system) of all the server's processes per request answered.",
        "",
        "Setup:",
        "",
        f"- cuts: late = {CUT_INDEX['late']} (after `_avg_pooling`: the tail is one linear layer); mid = "
        f"{CUT_INDEX['mid']} (after `_blocks.7`); request codec `{CODEC}` (frames of about 1.8 KB and "
        "58 KB), "
        "response `f32`, one image per request;",
        f"- device: `{args.device}` (both servers' tails; frames are decoded and answers encoded on the "
        "host);",
        f"- same batch settings for all: at most {args.max_batch_size} per batch, "
        f"{args.delay_ms:g} ms queue delay;",
        f"- splitinfer: `splitinfer serve --max-batch-size {args.max_batch_size} "
        f"--max-queue-delay-ms {args.delay_ms:g}{_thread_flags(args)}` (one process: aiohttp on an asyncio "
        "loop, tails on a pool of compute threads; by default one compute thread per core, each running "
        "torch with cores / compute threads = 1 thread);"
        + (
            f" `splitinfer inline` adds `--inline-below-ms {args.inline_ms:g}` (batches predicted to "
            "take less run on the event loop; late cut only, the mid cut's batches are far above it);"
            if args.inline_ms > 0
            else ""
        ),
        f"- LitServe {_litserve_version()}, configured as its documentation recommends for throughput: "
        f"`fast_queue=True` (ZeroMQ), `workers_per_device={args.lit_workers}` (its docstring: for CPU, the "
        "number of cores), `num_api_servers` left at its default (= the number of inference workers), "
        "batching through `LitAPI(max_batch_size, batch_timeout)` with `batch`/`unbatch`, uvicorn with "
        f"uvloop and httptools, log level warning, {args.lit_torch_threads} torch thread per worker. Its API "
        'takes JSON, so the same frame travels base64-encoded in `{"frame": ...}`; the worker decodes, '
        "batches, runs the same `Bundle.run_segments`, splits and encodes as splitinfer does;",
        f"- client: aiohttp in a separate process, closed loop with C requests in flight, per round "
        f"{args.warmup:g} s of warm-up then {args.seconds / args.rounds:g} s (at most {args.limit} "
        "requests), 127.0.0.1 only."
        + (
            f"\n- `{WAKER_NAME}` (mid cut, a control, not a configuration to deploy): the `splitinfer` "
            "server started next to a process in its session that only sleeps 0.5 ms in a loop "
            "(its CPU is counted in the server's);"
            if any(r.server == WAKER_NAME for r in results)
            else ""
        ),
        "",
        "| cut | C | server | req/s | p50 ms | p99 ms | errors | CPU ms/req | req/s vs LitServe "
        "(rounds min-max) | p99 vs LitServe |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cut in CUTS:
        for c in args.concurrency:
            lit = _cell(results, "litserve", cut, c)
            for name in names:
                r = _cell(results, name, cut, c)
                if r is None:
                    continue
                ratio = p99 = ""
                if name != "litserve" and lit is not None and lit.rps > 0:
                    ratio, p99 = f"{r.rps / lit.rps:.2f}x", f"{r.p99_ms / lit.p99_ms:.2f}x"
                    spread = _round_ratios(r, lit)
                    if spread:
                        ratio += f" ({min(spread):.2f}-{max(spread):.2f})"
                errors = sum(r.errors.values())
                cpu = "" if r.cpu_ms is None else f"{r.cpu_ms:.1f}"
                lines.append(
                    f"| {cut} | {c} | {name} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {errors} "
                    f"| {cpu} | {ratio} | {p99} |"
                )
    lines += ["", "Targets (splitinfer with its default event-loop/pool split unless said otherwise):", ""]
    lines += _verdicts(results)
    lines += [
        "",
        "Notes:",
        "",
        "- At the late cut the tail is a fraction of a millisecond, so the serving path is what is "
        "measured: one aiohttp event loop that reads, checks and decodes small frames itself and hands "
        "whole batches to a compute thread, against uvicorn processes that pass every request through "
        "ZeroMQ to worker processes and back.",
        "- At the mid cut the tail's compute is nearly all the time, and both servers run the same "
        "tail, one batch per core, each with one torch thread. What decides the throughput is "
        "whether both cores stay busy: until 2026-11-24 splitinfer's batcher put every queued request "
        "into one batch, so C clients in a closed loop stayed in lockstep on one compute thread while "
        "the other idled (0.97 of 2 cores used at C = 8; 0.69x-0.92x LitServe there). The batcher now "
        "shares the queued rows out over the free compute threads (cloud/_batcher.py), and the mid "
        "cut went from 82 to 165 req/s at C = 8 on a quiet machine. splitinfer also spends less CPU "
        "per request (the `CPU ms/req` column). On a machine loaded by other sessions, LitServe's "
        "processes, which wake up hundreds of times a second even when idle, get a larger share of "
        "the CPU; `--waker` measures that control.",
        "- The server-overhead target is read from the server's own Server-Timing header (total minus "
        "compute, both measured inside the server); the client-side figure adds the loopback round "
        "trip and the Python client, which are not the server's.",
    ]
    return "\n".join(lines) + "\n"


def _round_ratios(ours: Result, lit: Result) -> list[float]:
    """Throughput against LitServe round by round (the slices of one round ran back to back)."""
    return [a / b for a, b in zip(ours.round_rps, lit.round_rps) if b > 0]


def _thread_flags(args: argparse.Namespace) -> str:
    flags = ""
    if args.compute_threads is not None:
        flags += f" --compute-threads {args.compute_threads}"
    if args.torch_threads is not None:
        flags += f" --torch-threads {args.torch_threads}"
    return flags


def _verdicts(results: list[Result]) -> list[str]:
    out = []
    lit32 = _cell(results, "litserve", "late", 32)
    for name in ("splitinfer", "splitinfer inline"):
        ours32 = _cell(results, name, "late", 32)
        if ours32 and lit32:
            ratio = ours32.rps / lit32.rps
            met = ratio >= 1.5 and ours32.p99_ms < lit32.p99_ms
            out.append(
                f"- late cut, C = 32, at least 1.5x LitServe's throughput with a lower p99 ({name}): "
                f"**{'met' if met else 'missed'}** ({ratio:.2f}x the throughput; p99 {ours32.p99_ms:.1f} ms "
                f"against {lit32.p99_ms:.1f} ms)."
            )
    ratios = []
    for c in sorted({r.concurrency for r in results}):
        o, lt = _cell(results, "splitinfer", "mid", c), _cell(results, "litserve", "mid", c)
        if o and lt:
            ratios.append((o.rps / lt.rps, c))
    if ratios:
        worst, at = min(ratios)
        out.append(
            f"- mid cut, no worse than LitServe: **{'met' if worst >= 0.95 else 'missed'}** (throughput "
            f"ratios {', '.join(f'{r:.2f}x at C = {c}' for r, c in ratios)}; "
            f"lowest {worst:.2f}x at C = {at}; "
            "within 5% counted as equal on this noisy machine)."
        )
    one = _cell(results, "splitinfer", "late", 1)
    if one and one.overhead_server_ms is not None:
        met = one.overhead_server_ms <= 1.0
        out.append(
            f"- server overhead at C = 1 (late cut) at most 1 ms: **{'met' if met else 'missed'}** "
            "(median of "
            f"Server-Timing total minus compute: {one.overhead_server_ms:.3f} ms; seen from the client, "
            f"latency minus compute, which adds the loopback round trip and the client's own time: "
            f"{one.overhead_client_ms:.3f} ms)."
        )
    out += _mid_cpu(results)
    mid1 = _cell(results, "splitinfer", "mid", 1)
    if mid1 and mid1.overhead_server_ms is not None:
        out.append(
            f"- for reference, at the mid cut and C = 1 the server's total minus compute is "
            f"{mid1.overhead_server_ms:.3f} ms (the frame is 30x larger, so decoding it costs more)."
        )
    return out


def _mid_cpu(results: list[Result]) -> list[str]:
    """What the mid cut costs each server in CPU, and the waker control's throughput."""
    cpu, given, woken = [], [], []
    for c in sorted({r.concurrency for r in results}):
        o, lt = _cell(results, "splitinfer", "mid", c), _cell(results, "litserve", "mid", c)
        w = _cell(results, WAKER_NAME, "mid", c)
        if o and lt and o.cpu_ms and lt.cpu_ms:
            cpu.append(f"{o.cpu_ms / lt.cpu_ms:.2f}x at C = {c}")
            given.append(f"{o.rps * o.cpu_ms / 1000:.2f} against {lt.rps * lt.cpu_ms / 1000:.2f} at C = {c}")
        if w and lt and lt.rps > 0:
            woken.append(f"{w.rps / lt.rps:.2f}x at C = {c}")
    out = []
    if cpu:
        out.append(
            "- mid cut, CPU per request, splitinfer against LitServe (lower is better; what the "
            f"throughput would follow with the same CPU): {', '.join(cpu)}."
        )
        out.append(
            "- mid cut, cores the machine gave each server while it was measured (req/s x CPU per "
            f"request), splitinfer against LitServe: {'; '.join(given)}."
        )
    if woken:
        out.append(f"- control, `{WAKER_NAME}` throughput against LitServe's: {', '.join(woken)}.")
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
    c = sub.add_parser("client", help="(internal) drive one server for one slice")
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
    lit.add_argument("--device", required=True)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (C = 1 and 32, one round)")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per point and server")
    parser.add_argument("--rounds", type=int, default=None, help="rounds the seconds are split into")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds per round")
    parser.add_argument("--limit", type=int, default=20000, help="most requests per round")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--delay-ms", type=float, default=2.0)
    parser.add_argument("--compute-threads", type=int, default=None, help="default: the server's")
    parser.add_argument("--torch-threads", type=int, default=None, help="default: the server's")
    parser.add_argument("--inline-ms", type=float, default=2.0, help="also measure --inline-below-ms (0: no)")
    parser.add_argument("--lit-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--lit-torch-threads", type=int, default=1)
    parser.add_argument("--skip-litserve", action="store_true")
    parser.add_argument(
        "--waker", action="store_true", help=f"also measure the control {WAKER_NAME!r} at the mid cut"
    )
    parser.add_argument(
        "--bundle", type=Path, default=None, help="a saved bundle of the model (default: compile one)"
    )
    parser.add_argument("--cuts", default="late,mid", help="which cuts to measure (late, mid)")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: results/server.md (cuda: server-cuda.md)"
    )
    parser.add_argument(
        "--device", default="cpu", help="where both servers run the tails: cpu, cuda or cuda:N (default cpu)"
    )
    args = parser.parse_args(argv)
    if args.out is None:
        name = "server.md" if args.device == "cpu" else "server-cuda.md"
        args.out = HERE.parent / "results" / name
    if args.mode == "client":
        return client_main(args)
    if args.mode == "litserve":
        return litserve_main(args)
    for name in set(CUTS) - set(args.cuts.split(",")):
        del CUTS[name]
    args.concurrency = args.concurrency or ([1, 32] if args.quick else [1, 8, 32, 64])
    args.seconds = args.seconds or (1.5 if args.quick else 6.0)
    args.rounds = args.rounds or (1 if args.quick else 4)
    args.warmup = args.warmup or (0.5 if args.quick else 0.75)
    if not args.skip_litserve and _litserve_version() == "(not installed)":
        print("LitServe is not installed (pip install litserve); measuring splitinfer alone", file=sys.stderr)
        args.skip_litserve = True
    load0 = os.getloadavg()[0]
    results = bench(args)
    text = report(results, args, (load0, os.getloadavg()[0]))
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
