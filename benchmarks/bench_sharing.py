"""Weights shared across models: memory, mixed-model batches and one upload for two tasks.

Two tasks fine-tuned from one backbone: EfficientNet-Lite0 with its ImageNet weights (task
``imagenet``) and the same network with another classifier (``_fc`` re-initialised, seeded:
task ``other``), so every segment but the classifier's is equal bit for bit. Both are compiled
and saved in one repository; a real ``splitinfer serve`` process (127.0.0.1) is started with

- ``imagenet`` alone (the baseline: one model),
- both, with ``--share-weights`` (the default: equal segments are kept once),
- both, with ``--no-share-weights`` (each model keeps its own copy),

and three parts are measured (``--parts``, default all):

- ``memory``: its resident memory (VmRSS, after one request per model at every measured cut),
  read from /proc. Every configuration runs ``--rounds`` times, interleaved; the medians are
  reported with the memory each configuration adds over the one-model baseline, in the same run.
- ``batching``: ``--clients`` closed-loop clients (half of them each model's) post ready-made
  frames at an early cut, where the shared backbone is most of the tail, for ``--seconds`` per
  round, against ``--share-weights`` (requests of both models join one batch for the shared
  segments) and ``--no-share-weights`` (each model batches alone), interleaved: requests a
  second, latency percentiles, and the server's ``splitinfer_shared_batches_total``.
- ``upload``: a device behind an emulated link (``--link``, a netem profile, constant rates)
  wants both tasks' answers for one image: ``EdgeClient(tasks=[other]).ainfer_many`` (one head,
  one upload, both answers) against two EdgeClients each sending its own request (both at once),
  at three cuts of the shared head with the same codec: bytes sent and latency, interleaved.

Writes benchmarks/results/sharing.md (a part not run keeps its section of the existing file).
Run: `.venv/bin/python benchmarks/bench_sharing.py` (about ten minutes: two compiles, calibrated on
8 photos; `--rounds 1 --seconds 5` for a quick one).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import re
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import torch

HERE = Path(__file__).resolve()

from _common import RESULTS, efficientnet_lite0, load_average, machine  # noqa: E402

import splitinfer as si  # noqa: E402
from splitinfer import protocol  # noqa: E402
from splitinfer.edge import EdgeClient  # noqa: E402
from splitinfer.lab import ServerProcess, compile_on_photos, photo_batch  # noqa: E402
from splitinfer.netem import PROFILES, BandwidthTrace, LinkEmulator  # noqa: E402
from splitinfer.tensors import specs_of  # noqa: E402

MiB = 1024 * 1024
PARTS = ("memory", "batching", "upload")
#: The codec both parts send (q8 per tensor: what the policy picks at these cuts on slow links).
CODEC = "q8+zstd1"


def _rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    assert match
    return int(match.group(1)) * 1024


def _models() -> dict[str, torch.nn.Module]:
    imagenet = efficientnet_lite0()
    other = copy.deepcopy(imagenet)
    torch.manual_seed(1)
    fc = other._fc
    assert isinstance(fc, torch.nn.Linear)
    fc.reset_parameters()  # another task's head on the same backbone
    return {"imagenet": imagenet.eval(), "other": other.eval()}


def _frame(bundle: si.Bundle, cut: int, x: torch.Tensor, codec: str = "f32") -> bytes:
    """A /v1 request frame of ``bundle``'s frontier at ``cut`` for ``x``, encoded with ``codec``."""
    frontier = bundle.head(cut, x)
    payload = bundle.codec_for(cut, codec).encode(frontier)
    header = protocol.RequestHeader(
        model=bundle.name,
        graph=bundle.graph_hash,
        cut=cut,
        codec=codec,
        tensors=specs_of(frontier),
        request_id="bench",
        payload_nbytes=len(payload),
    )
    return protocol.encode_request(header, payload)


def _post(url: str, bundle: si.Bundle, cut: int, x: torch.Tensor) -> None:
    request = urllib.request.Request(
        f"{url}/v1/models/{bundle.name}/infer",
        data=_frame(bundle, cut, x),
        headers={"Content-Type": protocol.FRAME_CONTENT_TYPE},
    )
    with urllib.request.urlopen(request, timeout=60) as r:  # 127.0.0.1 only
        assert r.status == 200


def _measure(repo: Path, bundles: dict[str, si.Bundle], names: list[str], *options: str) -> int:
    x = torch.rand(1, 3, 224, 224)
    with ServerProcess(repo, *options, "--compute-threads", "1") as server:
        assert server.proc is not None
        for name in names:
            bundle = bundles[name]
            for cut in (0, bundle.last_cut // 2, bundle.last_cut - 1):
                _post(server.url, bundle, cut, x)
        return _rss(server.proc.pid)


async def _closed_loop(
    url: str, frames: dict[str, bytes], clients: int, seconds: float
) -> tuple[list[float], int]:
    """``clients`` loops, client i posting model ``names[i % 2]``'s frame, each sending the next
    request when its answer arrives, for ``seconds``: every request's latency, and the errors."""
    names = sorted(frames)
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def loop(i: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        name = names[i % len(names)]
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            async with session.post(
                f"{url}/v1/models/{name}/infer",
                data=frames[name],
                headers={"Content-Type": protocol.FRAME_CONTENT_TYPE},
            ) as r:
                await r.read()
                if r.status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:  # 127.0.0.1 only
        await asyncio.gather(*(loop(i, session) for i in range(clients)))
    return latencies, errors


def _counter(url: str, name: str) -> float:
    """The sum of a counter's samples on the server's /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:  # 127.0.0.1 only
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def measure_batching(
    root: Path, bundles: dict[str, si.Bundle], cut: int, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Each configuration's requests a second, latencies and shared batches, ``args.rounds``
    rounds interleaved (a server each round: every configuration starts as cold)."""
    x = photo_batch(1, seed=3)
    frames = {name: _frame(b, cut, x, CODEC) for name, b in bundles.items()}
    configs = {"--share-weights": "--share-weights", "--no-share-weights": "--no-share-weights"}
    out: dict[str, dict[str, Any]] = {k: {"rps": [], "lat": [], "shared": 0.0, "errors": 0} for k in configs}
    for r in range(args.rounds):
        for label, option in configs.items():
            with ServerProcess(root, option, "--compute-threads", "1") as server:
                asyncio.run(_closed_loop(server.url, frames, args.clients, 2.0))  # warm-up
                before = _counter(server.url, "splitinfer_shared_batches_total")
                lat, errors = asyncio.run(_closed_loop(server.url, frames, args.clients, args.seconds))
                shared = _counter(server.url, "splitinfer_shared_batches_total") - before
            row = out[label]
            row["rps"].append(len(lat) / args.seconds)
            row["lat"] += lat
            row["shared"] += shared
            row["errors"] += errors
            print(
                f"round {r + 1}: {label}: {len(lat) / args.seconds:.1f} req/s, {shared:.0f} shared batches",
                flush=True,
            )
    return out


async def _upload_round(
    url: str, bundles: dict[str, si.Bundle], cut: int, x: torch.Tensor, link: str, n: int
) -> dict[str, list[tuple[float, int]]]:
    """``n`` rounds of: both answers by one upload, then by two requests; (seconds, bytes up)."""
    profile = PROFILES[link]
    host, port = url.rsplit(":", 1)
    emulator = LinkEmulator(
        (host.removeprefix("http://"), int(port)),
        uplink=BandwidthTrace.constant(profile.uplink_bps),
        downlink=BandwidthTrace.constant(profile.downlink_bps),
        delay_s=profile.delay_s,
    )
    first, second = bundles["imagenet"], bundles["other"]
    options: dict[str, Any] = {"policy": "static", "cut": cut, "codec": CODEC}
    out: dict[str, list[tuple[float, int]]] = {"one upload": [], "two requests": []}
    async with emulator:
        via = f"http://127.0.0.1:{emulator.port}"
        async with (
            EdgeClient(via, bundle=first, tasks=[second], **options) as many,
            EdgeClient(via, bundle=first, **options) as a,
            EdgeClient(via, bundle=second, **options) as b,
        ):
            for i in range(n + 1):  # the first round warms the connections up
                t0 = time.perf_counter()
                answers, trace = await many.ainfer_many(x, return_trace=True)
                t1 = time.perf_counter()
                assert trace.ran_on == "cloud" and set(answers) == {"imagenet", "other"}, trace
                (_, ta), (_, tb) = await asyncio.gather(
                    a.ainfer(x, return_trace=True), b.ainfer(x, return_trace=True)
                )
                t2 = time.perf_counter()
                assert ta.ran_on == tb.ran_on == "cloud", (ta, tb)
                if i:
                    out["one upload"].append((t1 - t0, trace.bytes_up))
                    out["two requests"].append((t2 - t1, ta.bytes_up + tb.bytes_up))
    return out


def measure_upload(
    root: Path, bundles: dict[str, si.Bundle], cuts: list[int], args: argparse.Namespace
) -> dict[int, dict[str, list[tuple[float, int]]]]:
    x = photo_batch(1, seed=4)
    out: dict[int, dict[str, list[tuple[float, int]]]] = {}
    with ServerProcess(root, "--share-weights") as server:
        for cut in cuts:
            out[cut] = asyncio.run(_upload_round(server.url, bundles, cut, x, args.link, args.requests))
            one = statistics.median(t for t, _ in out[cut]["one upload"])
            two = statistics.median(t for t, _ in out[cut]["two requests"])
            print(f"cut {cut}: one upload {one * 1e3:.0f} ms, two requests {two * 1e3:.0f} ms", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of memory and batching")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)} (default: all)"
    )
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients of the batching part")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds of each batching round")
    parser.add_argument("--link", default="3g", choices=sorted(PROFILES), help="the upload part's link")
    parser.add_argument("--requests", type=int, default=10, help="rounds of the upload part at each cut")
    parser.add_argument("--out", type=Path, default=RESULTS / "sharing.md")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}: choose from {', '.join(PARTS)}")
    if args.rounds < 1 or args.clients < 1 or args.seconds <= 0 or args.requests < 1:
        parser.error("--rounds, --clients and --requests must be >= 1 and --seconds > 0")
    previous = args.out.read_text() if args.out.exists() else ""
    models = _models()
    sections: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sharing-") as tmp:
        root = Path(tmp)
        bundles: dict[str, si.Bundle] = {}
        for name, model in models.items():
            print(f"compiling {name} ...", flush=True)
            bundles[name] = compile_on_photos(
                model,
                name=name,
                calibration=8,
                codecs=("f32", CODEC),
                max_frontier_bytes=130_000,
                runtimes=("torch",),
                progress=False,
            )
        (root / "one").mkdir()
        bundles["imagenet"].save(root / "one" / "imagenet")
        for name, bundle in bundles.items():
            bundle.save(root / "two" / name)
        shared_segments = sum(
            1
            for a, b in zip(bundles["imagenet"]._programs or [], bundles["other"]._programs or [])
            if _same(a, b)
        )
        n = bundles["imagenet"].n_segments
        # An early dense cut (the demo's cut 1-5 region), the middle, and the last shared cut.
        cuts = [min(5, n - 2), n // 2, shared_segments]
        if "memory" in parts:
            started, load = time.perf_counter(), load_average()
            configs = {
                "one model": (root / "one", ["imagenet"], ()),
                "two models, --share-weights": (root / "two", ["imagenet", "other"], ("--share-weights",)),
                "two models, --no-share-weights": (
                    root / "two",
                    ["imagenet", "other"],
                    ("--no-share-weights",),
                ),
            }
            rss: dict[str, list[int]] = {k: [] for k in configs}
            for r in range(args.rounds):
                for label, (repo, names, options) in configs.items():
                    rss[label].append(_measure(repo, bundles, names, *options))
                    print(f"round {r + 1}: {label}: {rss[label][-1] / MiB:.1f} MiB", flush=True)
            weights = sum(p.numel() * p.element_size() for p in models["imagenet"].parameters())
            sections["memory"] = [_when(started, load), "", *_report(rss, args, weights)]
            _write(args, sections, previous, shared_segments, n, models)
        if "batching" in parts:
            started, load = time.perf_counter(), load_average()
            batching = measure_batching(root / "two", bundles, cuts[0], args)
            sections["batching"] = [_when(started, load), "", *_report_batching(batching, cuts[0], args)]
            _write(args, sections, previous, shared_segments, n, models)
        if "upload" in parts:
            started, load = time.perf_counter(), load_average()
            upload = measure_upload(root / "two", bundles, cuts, args)
            sections["upload"] = [_when(started, load), "", *_report_upload(upload, bundles, args)]
    print(_write(args, sections, previous, shared_segments, n, models))
    return 0


def _write(
    args: argparse.Namespace,
    sections: dict[str, list[str]],
    previous: str,
    shared: int,
    n: int,
    models: dict[str, torch.nn.Module],
) -> str:
    """The report so far (each part's section written as it ends: a later failure loses none)."""
    text = _document(sections, previous, args, shared, n, models)
    args.out.write_text(text)
    return text


def _when(started: float, load: str) -> str:
    return f"Measured in {time.perf_counter() - started:.0f} s; load average when it started: {load}."


def _same(a: torch.export.ExportedProgram, b: torch.export.ExportedProgram) -> bool:
    from splitinfer.bundle import segment_key

    return segment_key(a) == segment_key(b)


TITLES = {
    "memory": "## Memory: two models on one backbone",
    "batching": "## Mixed-model batches: requests of both models through the shared segments at once",
    "upload": "## One upload for two tasks",
}


def _document(
    sections: dict[str, list[str]],
    previous: str,
    args: argparse.Namespace,
    shared: int,
    n: int,
    models: dict[str, torch.nn.Module],
) -> str:
    """The report: this run's sections, the other parts' sections kept from ``previous``."""
    kept = {}
    for part, title in TITLES.items():
        if title in previous:
            rest = previous.split(title, 1)[1]
            kept[part] = rest.split("\n## ", 1)[0].strip("\n").splitlines()
    weights = sum(p.numel() * p.element_size() for p in models["imagenet"].parameters())
    lines = [
        "# Weights shared across models: memory, mixed-model batches, one upload for two tasks",
        "",
        "Reproduce: `.venv/bin/python benchmarks/bench_sharing.py` (all parts; `--parts memory,upload` "
        "runs some and keeps the others' sections). "
        f"Machine: {machine()}.",
        "",
        "Two tasks on one backbone: EfficientNet-Lite0 with its ImageNet weights (`imagenet`), and the "
        "same network with its classifier (`_fc`, 1280 x 1000) re-initialised (`other`); compiled with "
        f"`max_frontier_bytes=130000`, calibrated on 8 photos: {n} segments each, {shared} of them equal "
        f"(same graph, weights and constants). The model's weights: {weights / MiB:.1f} MiB (float32). "
        "Each part says when it ran and under what load.",
        "",
    ]
    for part, title in TITLES.items():
        body = sections.get(part) or kept.get(part)
        if body:
            lines += [title, "", *body, ""]
    return "\n".join(lines)


def _report(rss: dict[str, list[int]], args: argparse.Namespace, weights: int) -> list[str]:
    median = {k: statistics.median(v) for k, v in rss.items()}
    base = median["one model"]
    lines = [
        "A real `splitinfer serve` process (one compute thread) answers one request per model at cuts "
        f"0, the middle and the last but one; then its VmRSS is read. Medians of {args.rounds} rounds, "
        "interleaved.",
        "",
        "| configuration | RSS MiB (median) | rounds | added over one model, MiB | "
        "added / one model's weights |",
        "|---|---:|---|---:|---:|",
    ]
    for label, values in rss.items():
        added = median[label] - base
        cells = ", ".join(f"{v / MiB:.0f}" for v in values)
        ratio = "" if label == "one model" else f"{added / weights:.2f}"
        lines.append(f"| {label} | {median[label] / MiB:.1f} | {cells} | {added / MiB:+.1f} | {ratio} |")
    shared_added = median["two models, --share-weights"] - base
    unshared_added = median["two models, --no-share-weights"] - base
    lines += [
        "",
        f"The second model costs {shared_added / MiB:.1f} MiB when its equal segments are shared and "
        f"{unshared_added / MiB:.1f} MiB when they are not"
        + (f" ({unshared_added / shared_added:.1f}x)" if shared_added > 0 else "")
        + ". What the shared configuration adds is the second classifier (1280 x 1000 float32, "
        f"{1281 * 1000 * 4 / MiB:.1f} MiB), the second model's manifest, fused runners and batchers, "
        "and allocator noise; the process's own base (Python, torch, aiohttp) is in every row.",
    ]
    return lines


def _report_batching(out: dict[str, dict[str, Any]], cut: int, args: argparse.Namespace) -> list[str]:
    lines = [
        f"{args.clients} closed-loop clients on 127.0.0.1, half of them `imagenet`'s and half `other`'s, "
        f"post ready-made `{CODEC}` frames of one photo at cut {cut} (the tail from there is the shared "
        "backbone, then each model's classifier) to a real `splitinfer serve` with one compute thread "
        f"and the default batching (16 rows, 2 ms), for {args.seconds:.0f} s a round after 2 s of "
        f"warm-up; {args.rounds} rounds, the configurations interleaved, a new server each round. "
        "Shared batches: `splitinfer_shared_batches_total`, batches that ran requests of both models "
        "through the shared segments.",
        "",
        "| configuration | req/s (median) | rounds | p50 ms | p95 ms | shared batches | errors |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    median = {}
    for label, row in out.items():
        median[label] = statistics.median(row["rps"])
        cells = ", ".join(f"{v:.1f}" for v in row["rps"])
        lines.append(
            f"| {label} | {median[label]:.1f} | {cells} | {_pct(row['lat'], 0.5) * 1e3:.0f} | "
            f"{_pct(row['lat'], 0.95) * 1e3:.0f} | {row['shared']:.0f} | {row['errors']} |"
        )
    ratio = median["--share-weights"] / median["--no-share-weights"]
    lines += [
        "",
        f"Batching both models' requests together serves {ratio:.2f}x the requests a second of batching "
        "each model alone, on the same compute thread.",
    ]
    return lines


def _report_upload(
    out: dict[int, dict[str, list[tuple[float, int]]]],
    bundles: dict[str, si.Bundle],
    args: argparse.Namespace,
) -> list[str]:
    profile = PROFILES[args.link]
    lines = [
        f"One device behind an emulated `{args.link}` link (netem's LinkEmulator, constant "
        f"{profile.uplink_bps / 1e6:g} Mbit/s up, {profile.downlink_bps / 1e6:g} down, "
        f"{profile.delay_s * 1e3:.0f} ms each way) to a real `splitinfer serve --share-weights`, wants "
        "both tasks' answers for one photo. **one upload**: `EdgeClient(bundle=imagenet, "
        "tasks=[other]).ainfer_many(x)` (one head, one frontier sent, both answers back). **two "
        "requests**: an EdgeClient per model, each running its head and sending its own request, "
        f"both at once (`asyncio.gather`). Static policy at each cut with `{CODEC}`; "
        f"{args.requests} rounds, the two interleaved, after a warm-up round; medians.",
        "",
        "| cut | frontier | bytes up: one upload | two requests | ratio | latency ms: one upload | "
        "two requests | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for cut, rows in out.items():
        spec = bundles["imagenet"].cuts[cut]
        shape = "x".join(map(str, spec.tensors[0].shape[1:]))
        t1 = statistics.median(t for t, _ in rows["one upload"])
        t2 = statistics.median(t for t, _ in rows["two requests"])
        b1 = statistics.median(b for _, b in rows["one upload"])
        b2 = statistics.median(b for _, b in rows["two requests"])
        lines.append(
            f"| {cut} | {spec.name} ({shape}) | {b1 / 1024:.1f} KiB | {b2 / 1024:.1f} KiB | {b1 / b2:.2f} | "
            f"{t1 * 1e3:.0f} | {t2 * 1e3:.0f} | {t1 / t2:.2f} |"
        )
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
