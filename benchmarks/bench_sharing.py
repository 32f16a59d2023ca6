"""Weights shared across models: the server's memory with two models that share a backbone.

Two tasks fine-tuned from one backbone: EfficientNet-Lite0 with its ImageNet weights (task
``imagenet``) and the same network with another classifier (``_fc`` re-initialised, seeded:
task ``other``), so every segment but the classifier's is equal bit for bit. Both are compiled
and saved in one repository; a real ``splitinfer serve`` process (127.0.0.1) is started with

- ``imagenet`` alone (the baseline: one model),
- both, with ``--share-weights`` (the default: equal segments are kept once),
- both, with ``--no-share-weights`` (each model keeps its own copy),

and its resident memory (VmRSS, after one request per model at every measured cut) is read from
/proc. Every configuration runs ``--rounds`` times, interleaved; the medians are reported with
the memory each configuration adds over the one-model baseline, in the same run.

Writes benchmarks/results/sharing.md. Run: `.venv/bin/python benchmarks/bench_sharing.py`
(about three minutes: two compiles; `--rounds 1` for a quick one).
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from _common import RESULTS, efficientnet_lite0, machine  # noqa: E402

import splitinfer as si  # noqa: E402
from splitinfer import protocol  # noqa: E402
from splitinfer.compression import get_codec  # noqa: E402
from splitinfer.lab._server import ServerProcess  # noqa: E402
from splitinfer.tensors import specs_of  # noqa: E402

MiB = 1024 * 1024


def _rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    assert match
    return int(match.group(1)) * 1024


def _models() -> dict[str, torch.nn.Module]:
    imagenet = efficientnet_lite0()
    other = copy.deepcopy(imagenet)
    torch.manual_seed(1)
    other._fc.reset_parameters()  # another task's head on the same backbone
    return {"imagenet": imagenet.eval(), "other": other.eval()}


def _post(url: str, bundle: si.Bundle, cut: int, x: torch.Tensor) -> None:
    frontier = bundle.head(cut, x)
    payload = get_codec("f32").encode(frontier)
    header = protocol.RequestHeader(
        model=bundle.name,
        graph=bundle.graph_hash,
        cut=cut,
        codec="f32",
        tensors=specs_of(frontier),
        request_id="bench",
        payload_nbytes=len(payload),
    )
    request = urllib.request.Request(
        f"{url}/v1/models/{bundle.name}/infer",
        data=protocol.encode_request(header, payload),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "sharing.md")
    args = parser.parse_args(argv)
    models = _models()
    with tempfile.TemporaryDirectory(prefix="bench-sharing-") as tmp:
        root = Path(tmp)
        bundles: dict[str, si.Bundle] = {}
        for name, model in models.items():
            print(f"compiling {name} ...", flush=True)
            bundles[name] = si.compile(
                model, (torch.rand(1, 3, 224, 224),), name=name, max_frontier_bytes=130_000
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
        configs = {
            "one model": (root / "one", ["imagenet"], ()),
            "two models, --share-weights": (root / "two", ["imagenet", "other"], ("--share-weights",)),
            "two models, --no-share-weights": (root / "two", ["imagenet", "other"], ("--no-share-weights",)),
        }
        rss: dict[str, list[int]] = {k: [] for k in configs}
        for r in range(args.rounds):
            for label, (repo, names, options) in configs.items():
                rss[label].append(_measure(repo, bundles, names, *options))
                print(f"round {r + 1}: {label}: {rss[label][-1] / MiB:.1f} MiB", flush=True)
    weights = sum(p.numel() * p.element_size() for p in models["imagenet"].parameters())
    text = _report(rss, args, weights, shared_segments, bundles["imagenet"].n_segments)
    args.out.write_text(text)
    print(text)
    return 0


def _same(a: torch.export.ExportedProgram, b: torch.export.ExportedProgram) -> bool:
    from splitinfer.bundle import segment_key

    return segment_key(a) == segment_key(b)


def _report(rss: dict[str, list[int]], args: argparse.Namespace, weights: int, shared: int, n: int) -> str:
    median = {k: statistics.median(v) for k, v in rss.items()}
    base = median["one model"]
    lines = [
        "# Weights shared across models: server memory with two models on one backbone",
        "",
        f"Reproduce: `.venv/bin/python benchmarks/bench_sharing.py --rounds {args.rounds}`. "
        f"Machine: {machine()}.",
        "",
        "Two tasks on one backbone: EfficientNet-Lite0 with its ImageNet weights, and the same network "
        "with its classifier (`_fc`, 1280 x 1000) re-initialised; compiled with "
        f"`max_frontier_bytes=130000`: {n} segments each, {shared} of them equal (same graph, weights "
        f"and constants). The model's weights: {weights / MiB:.1f} MiB (float32). A real `splitinfer "
        "serve` process (one compute thread) answers one request per model at cuts 0, the middle and the "
        f"last but one; then its VmRSS is read. Medians of {args.rounds} rounds, interleaved.",
        "",
        "| configuration | RSS MiB (median) | rounds | added over one, MiB | added / one model's weights |",
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
        "",
        "Not measured here: batching requests of different models together where their segments are "
        "shared, and one upload answered by several task tails (both not built yet).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
