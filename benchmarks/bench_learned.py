"""Early exits learned from unlabelled photos (issue 32), on EfficientNet-Lite0.

Writes benchmarks/results/learned.md. Run:
`.venv/bin/python benchmarks/bench_learned.py --images ../shared/imagenet-samples [--seconds S]`.

The photos are split by class (the integer each file name starts with): two fifths of the
classes train the exit heads (no labels used), two fifths calibrate their thresholds, one fifth
evaluates them, so every figure is on photos of classes neither training nor calibration saw.
Without --images the shipped sample photos are cut into random crops (unlabelled; no accuracy).

Per exit: the threshold compile would store (the Wilson lower bound of the exited answers'
agreement at --confidence meets --budget on the calibration photos), for comparison the
threshold at which the calibration's point estimate meets the budget, and the bound's at a
lower budget the photos can show (--low-budget at --low-confidence, labelled so); for each, on
the evaluation photos: the exit rate, the agreement of exited answers with the full model, the
whole stream's agreement and, with labels, top-1 accuracy against the full model's.

Then the policy replay (bench_policy.simulate over --traces, default the shipped traces) with
the exits offered against without: the bundle profiled here (its exit heads too, one thread),
the device slowdown at which all-on-device ties with all-in-the-cloud (without exits), f32 at
every cut; each exit priced at its calibration photos' exit rate, and each replayed request
answered at an exit exactly when the evaluation photo it stands for (request j: photo j mod n)
exits there. Without --budget's exits qualifying, the replay at the lower budget shows what an
exit is worth.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import DEFAULT_TRACES, RESULTS, efficientnet_lite0, machine


def _load(images: str | None, limit: int | None) -> tuple[torch.Tensor, list[int] | None]:
    if images is None:
        from splitinfer.lab import photo_batch

        return photo_batch(limit or 160, seed=3, jitter=True), None
    from splitinfer.partitioner.learning import load_images

    batch, labels = load_images(Path(images), 224)
    if limit:
        batch, labels = batch[:limit], None if labels is None else labels[:limit]
    return batch, labels


def _split(n: int, labels: list[int] | None) -> tuple[list[int], list[int], list[int]]:
    """Indices of training, calibration and evaluation photos: by class with labels (2:2:1 of
    the classes), else by position."""
    keys = labels if labels is not None else list(range(n))
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for i, key in enumerate(keys):
        fifth = key % 5
        parts[0 if fifth < 2 else 1 if fifth < 4 else 2].append(i)
    return parts


def _point_threshold(conf: list[float], agree: list[bool], budget: float) -> float | None:
    """The lowest threshold at which the exited inputs' agreement (point estimate) meets ``budget``."""
    order = sorted(range(len(conf)), key=lambda i: -conf[i])
    best, agreeing = None, 0
    for rank, i in enumerate(order, start=1):
        agreeing += bool(agree[i])
        if agreeing / rank >= budget:
            best = conf[i]
    return best


def _evaluate(
    probs: torch.Tensor, want: torch.Tensor, labels: torch.Tensor | None, threshold: float | None
) -> dict[str, Any]:
    n = int(want.shape[0])
    if threshold is None:
        return {"rate": 0.0, "exited": 0, "agree": None, "stream": 1.0, "acc": None}
    conf, top = probs.max(dim=1)
    mask = conf >= threshold
    exited = int(mask.sum())
    agree = int((top[mask] == want[mask]).sum())
    answers = torch.where(mask, top, want)
    out: dict[str, Any] = {
        "rate": exited / n,
        "exited": exited,
        "agree": agree / exited if exited else None,
        "stream": float((answers == want).float().mean()),
        "acc": None,
    }
    if labels is not None:
        out["acc"] = float((answers == labels).float().mean())
    return out


#: Threshold rules of the exits table; the replay offers the exits of the two rules compile can
#: store (the bound at --budget, the bound at --low-budget), not the point estimate's.
BOUND, POINT, LOW = "bound (compile)", "point estimate", "bound at the lower budget"


@dataclass(frozen=True)
class RuleExits:
    """The exits of one threshold rule: per exit cut its threshold (None: never answers), the
    share of the calibration photos it answers (what the cost model prices) and, per evaluation
    photo, whether it answers it (what the replay replays)."""

    thresholds: dict[int, float | None]
    rates: dict[int, float]
    outcomes: dict[int, list[bool]]


def _replay_section(
    args: argparse.Namespace,
    bundle: Any,
    entries: list[dict[str, Any]],
    heads: dict[int, Any],
    rules: dict[str, RuleExits],
) -> list[str]:
    """The policy replay with each rule's exits offered against without (module docstring)."""
    import copy

    from bench_policy import INTERVAL_S, p95, simulate, trace_links

    from splitinfer.lab.evaluation import tie_slowdown
    from splitinfer.manifest import exit_file
    from splitinfer.partitioner import profile_bundle

    t0 = time.perf_counter()
    bundle.exit_heads.update(heads)  # every head timed, whether its rule lets it answer or not
    bundle.exits = [dict(e, threshold=1.0, file=exit_file(e["cut"])) for e in entries]
    bundle.profiles["host"] = profile_bundle(
        bundle, batch_sizes=(1,), codecs=["f32"], threads=1, progress=False
    )
    profile_s = time.perf_counter() - t0
    exit_s = bundle.profiles["host"].get("exits", {}).get("1", {})

    def offered(rule: RuleExits | None) -> Any:
        variant = copy.copy(bundle)
        variant.exits = [
            dict(
                e,
                threshold=rule.thresholds[e["cut"]],
                exit_rate=rule.rates[e["cut"]],
                file=exit_file(e["cut"]) if rule.thresholds[e["cut"]] is not None else None,
            )
            for e in (entries if rule is not None else [])
        ]
        return variant

    plain = offered(None)
    sets = trace_links(Path(args.traces), args.replay_traces)
    every = [link for links in sets.values() for link in links]
    ds = tie_slowdown(plain, every[:: max(1, len(every) // 12)][:12])
    head_n = sum(plain.profiles["host"]["segments"]["1"]["median_s"])
    out = [
        "",
        "## The policy replay with exits offered against without",
        "",
        f"`bench_policy.simulate` over {args.traces} ("
        + ", ".join(f"{k}: {len(v)} traces" for k, v in sets.items())
        + f"; a request every {INTERVAL_S:g} s), EfficientNet-Lite0 profiled here on one thread in "
        f"{profile_s:.0f} s "
        f"(head to the last cut {head_n * 1000:.1f} ms; exit heads "
        + ", ".join(f"cut {k} {float(v) * 1000:.2f} ms" for k, v in exit_s.items())
        + f"), device slowdown {ds:g}x (all-on-device ties with all-in-the-cloud without exits), f32 at "
        "every cut. An exit is priced at the share of the calibration photos it answers; request j is "
        "answered there exactly when evaluation photo j mod n exits there (per trace from photo 0). "
        "`adaptive`: the product's policy with its own estimator, hedged; `oracle`: the hindsight "
        "oracle over the same candidates (it knows which requests exit).",
        "",
        "| trace set | exits offered | exit rate priced | adaptive mean ms | adaptive p95 ms "
        "| answered at an exit | local mean ms | oracle mean ms | adaptive mean / without exits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    variants: list[tuple[str, RuleExits | None]] = [("none", None)]
    variants += [
        (f"{name} ({_rule_budget(args, name)})", rule) for name, rule in rules.items() if name != POINT
    ]
    if args.what_if:  # not measured: what the target exit rate would be worth
        cuts = [e["cut"] for e in entries]
        variants.append(
            (
                f"what-if: each exit answers {args.what_if:.0%} (seeded draws, not photos: no exit here "
                "shows it)",
                RuleExits(dict.fromkeys(cuts, 0.5), dict.fromkeys(cuts, args.what_if), {}),
            )
        )
    for set_name, links in sets.items():
        base = None
        for label, rule in variants:
            b = offered(rule)
            lat: dict[str, list[float]] = {"adaptive": [], "local": [], "oracle": []}
            exited = 0
            for i, link in enumerate(links):
                runners, oracle, _ = simulate(
                    b,
                    link,
                    ds,
                    (b.last_cut, "f32"),
                    args.seed + i,
                    exit_outcomes=None if rule is None else rule.outcomes,
                )
                lat["adaptive"] += runners["adaptive"].latencies
                lat["local"] += runners["local"].latencies
                lat["oracle"] += oracle
                exited += runners["adaptive"].exited
            mean = statistics.mean(lat["adaptive"])
            base = mean if base is None else base
            rates = (
                "-" if rule is None else ", ".join(f"cut {k} {100 * r:.1f}%" for k, r in rule.rates.items())
            )
            out.append(
                f"| {set_name} | {label} | {rates} | {mean * 1000:.0f} | {p95(lat['adaptive']) * 1000:.0f} "
                f"| {exited / len(lat['adaptive']):.1%} | {statistics.mean(lat['local']) * 1000:.0f} "
                f"| {statistics.mean(lat['oracle']) * 1000:.0f} | {mean / base:.3f} |"
            )
    out += ["", f"Replay {time.perf_counter() - t0:.0f} s (the profile included)."]
    return out


def _rule_budget(args: argparse.Namespace, rule: str) -> str:
    if rule == LOW:
        return (
            f"agreement >= {args.low_budget} at confidence {args.low_confidence}: a lower budget, "
            "not the product's"
        )
    return f"agreement >= {args.budget} at confidence {args.confidence}"


def _t(entries: list[dict[str, Any]], key: str) -> str:
    value = entries[0]["training"].get(key) if entries else None
    return "-" if value is None else f"{value:.0f}" if isinstance(value, float) else str(value)


def _bottleneck_section(
    args: argparse.Namespace,
    bundle: Any,
    model: torch.nn.Module,
    batch: torch.Tensor,
    labels: list[int] | None,
    split: tuple[list[int], list[int], list[int]],
) -> list[str]:
    """Bottlenecks at one cut against the scalar codecs there: bytes, agreement, accuracy."""
    from splitinfer.compression import get_codec
    from splitinfer.partitioner.learning import Training, train_bottleneck, trained

    train_i, _, eval_i = split
    named = [c.index for c in bundle.cuts if c.name == args.bottleneck] or [
        c.index
        for c in bundle.cuts
        if args.bottleneck in c.name and len(c.tensors) == 1 and len(c.tensors[0].shape) == 4
    ]
    k = named[-1] if named else None
    if k is None:
        raise SystemExit(f"no cut named {args.bottleneck!r}")
    ev = torch.cat([batch[i : i + 1] for i in eval_i])
    ev_labels = None if labels is None else torch.tensor([labels[i] for i in eval_i])
    with torch.no_grad():
        frontier = torch.cat([bundle.head(k, c)[0] for c in ev.split(16)])
        want = torch.cat([model(c) for c in ev.split(16)]).argmax(dim=1)

    def judged(rebuilt: torch.Tensor) -> tuple[float, str]:
        with torch.no_grad():
            got = torch.cat([bundle.tail(k, [r]) for r in rebuilt.split(16)]).argmax(dim=1)
        acc = "-" if ev_labels is None else f"{float((got == ev_labels).float().mean()):.3f}"
        return float((got == want).float().mean()), acc

    f32 = bundle.cut(k).nbytes
    out = [
        "",
        f"## Bottleneck at cut {k} ({args.bottleneck}, float32 {f32 / 1024:.1f} KiB)",
        "",
        f"Trained on the {len(train_i)} training photos ({args.views} view(s), {args.train_steps} steps, "
        "model frozen, no labels); judged on the evaluation photos. Scalar codecs at the same cut "
        "with ranges per blob (no calibration) for comparison.",
    ]
    if ev_labels is not None:
        out.append(f"Full model top-1 on them: {float((want == ev_labels).float().mean()):.3f}.")
    out += [
        "",
        "| codec | bytes (mean) | x smaller than f32 | agreement | top-1 | training s |",
        "|---|---|---|---|---|---|",
    ]
    for spec in ("q8+zstd1", "q4c+zstd1", "q2c+zstd1"):
        codec = get_codec(spec)
        blobs = [codec.encode([f.unsqueeze(0)]) for f in frontier]
        rebuilt = torch.cat([codec.decode(b, max_nbytes=1 << 26)[0] for b in blobs])
        agree, acc = judged(rebuilt)
        mean = sum(map(len, blobs)) / len(blobs)
        out.append(f"| {spec} | {mean:.0f} | {f32 / mean:.1f} | {agree:.3f} | {acc} | - |")
    rows = [(batch[i : i + 1],) for i in train_i]
    shape = tuple(int(d) for d in frontier.shape[1:])
    for config in args.configs.split(","):
        latent, bits = (int(v) for v in config.split("x"))
        options = Training(steps=args.train_steps, views=args.views, seconds=args.seconds, seed=0, batch=16)
        module, record = train_bottleneck(bundle, k, rows, options, latent=latent, bits=bits, rate=args.rate)
        bound = trained(module, shape, bits)  # the codec a bundle would offer: real blobs, header included
        for stage in ("+zstd3", "+ans"):
            codec = get_codec(f"bn{latent}q{bits}{stage}", bottleneck=bound)
            blobs = [codec.encode([f.unsqueeze(0)]) for f in frontier]
            rebuilt = torch.cat([codec.decode(b)[0] for b in blobs])
            mean = sum(map(len, blobs)) / len(blobs)
            agree, acc = judged(rebuilt)
            out.append(
                f"| bn{latent}q{bits}{stage} (rate {args.rate:g}) | {mean:.0f} | {f32 / mean:.1f} "
                f"| {agree:.3f} | {acc} | {record['seconds']:.0f} |"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", help="a folder of labelled photos (default: the shipped sample photos)")
    p.add_argument("--limit", type=int, help="use only the first N photos")
    p.add_argument("--exits", default=None, help="cuts, e.g. 20,40 (default: picked by cost)")
    p.add_argument("--budget", type=float, default=0.99)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--views", type=int, default=2, help="views per training photo (1 plain + augmented)")
    p.add_argument("--seconds", type=float, default=None, help="time budget for the teacher's passes")
    p.add_argument("--out", default=str(RESULTS / "learned.md"))
    p.add_argument("--no-exits", action="store_true", help="skip the exits (with --bottleneck)")
    p.add_argument(
        "--bottleneck", metavar="CUT_NAME", help="train bottlenecks at this cut, e.g. 'after _blocks.5'"
    )
    p.add_argument("--configs", default="16x4,8x2", help="bottlenecks as LATENTxBITS, comma-separated")
    p.add_argument(
        "--rate", type=float, default=0.0, help="weight of the bottleneck's rate term (bits per code)"
    )
    p.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    p.add_argument(
        "--low-budget", type=float, default=0.9, help="the lower budget the exits are also shown at"
    )
    p.add_argument("--low-confidence", type=float, default=0.9, help="its one-sided confidence")
    p.add_argument("--traces", default=str(DEFAULT_TRACES), help="trace sets the replay runs over")
    p.add_argument(
        "--replay-traces", type=int, default=24, help="traces per set in the replay (evenly spaced)"
    )
    p.add_argument("--no-replay", action="store_true", help="skip the policy replay")
    p.add_argument("--seed", type=int, default=0, help="the replay's seed")
    p.add_argument(
        "--what-if",
        type=float,
        default=0.0,
        help="also replay every exit answering this share of requests (seeded draws; labelled what-if)",
    )
    p.add_argument(
        "--feature-weight",
        type=float,
        default=0.0,
        help="an experiment: also match the teacher's features at the feature cut (0: as compile)",
    )
    args = p.parse_args(argv)

    import splitinfer as si
    from splitinfer.partitioner.learning import Training, calibrate_threshold, pick_exits, train_exits

    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    started = time.perf_counter()
    batch, labels = _load(args.images, args.limit)
    train_i, cal_i, eval_i = _split(batch.shape[0], labels)
    rows = [(batch[i : i + 1],) for i in range(batch.shape[0])]
    model = efficientnet_lite0()
    t0 = time.perf_counter()
    bundle = si.compile(model, (batch[:1],), name="effnet", codecs=["f32"], runtimes=("torch",))
    compile_s = time.perf_counter() - t0
    if args.no_exits:
        lines: list[str] = []
    else:
        cuts = [int(c) for c in args.exits.split(",")] if args.exits else pick_exits(bundle)
        options = Training(steps=args.train_steps, views=args.views, seconds=args.seconds, seed=0)
        t0 = time.perf_counter()
        entries, heads = train_exits(
            bundle,
            [rows[i] for i in train_i],
            [rows[i] for i in cal_i],
            "calibration",
            cuts,
            options,
            args.budget,
            args.confidence,
            feature_weight=args.feature_weight,
        )
        train_s = time.perf_counter() - t0
        ev = torch.cat([batch[i : i + 1] for i in eval_i])
        ev_labels = None if labels is None else torch.tensor([labels[i] for i in eval_i])
        cal = torch.cat([batch[i : i + 1] for i in cal_i])
        with torch.no_grad():
            want = torch.cat([model(c) for c in ev.split(16)]).argmax(dim=1)
            cal_want = torch.cat([model(c) for c in cal.split(16)]).argmax(dim=1)
        float_acc = None if ev_labels is None else float((want == ev_labels).float().mean())
        lines = [
            "# Early exits learned from unlabelled photos (issue 32)",
            "",
            f"`benchmarks/bench_learned.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
            f"on {machine()};",
            f"load average at start {' '.join(load)} (2 cores shared with other work), "
            f"{os.cpu_count()} cores.",
            f"Photos: {args.images or 'shipped sample photos (random crops, unlabelled)'}, "
            f"{batch.shape[0]} in all:",
            f"{len(train_i)} train the exit heads (labels unused; {args.views} view(s) each, augmented), "
            f"{len(cal_i)} calibrate the thresholds, {len(eval_i)} evaluate, "
            + ("split by class (no class in two sets)." if labels is not None else "split by position."),
            f"Budget: agreement >= {args.budget} with the full model, the bound at one-sided "
            f"confidence {args.confidence}."
            + (
                f" Experiment: the heads also match the teacher's features at the feature cut "
                f"(weight {args.feature_weight}; compile does not)."
                if args.feature_weight
                else ""
            ),
            f"Compile (capture, {len(bundle.cuts)} cuts): {compile_s:.0f} s; exits trained and calibrated in "
            f"{train_s:.0f} s (teacher passes over the training photos {_t(entries, 'teacher_seconds')} s, "
            f"{_t(entries, 'views')} view(s); fit {args.train_steps} steps {_t(entries, 'fit_seconds')} s; "
            "the rest: the calibration photos through the model and the heads).",
        ]
        if float_acc is not None:
            lines.append(f"Full model's top-1 accuracy on the evaluation photos: {float_acc:.3f}.")
        rules: dict[str, RuleExits] = {}
        lines += [
            "",
            "| exit cut | name | head agrees (cal) | threshold rule | threshold | exit rate (eval) "
            "| exited agree (eval) | stream agree | stream top-1 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for entry in entries:
            k = entry["cut"]
            head = heads[k]
            with torch.no_grad():
                feats = [bundle.head(k, c)[0] for c in ev.split(16)]
                probs = torch.softmax(torch.cat([head(f) for f in feats]), dim=1)
                cal_feats = [bundle.head(k, c)[0] for c in cal.split(16)]
                cal_probs = torch.softmax(torch.cat([head(f) for f in cal_feats]), dim=1)
            conf, top = cal_probs.max(dim=1)
            cal_agree = (top == cal_want).tolist()
            point = _point_threshold(conf.tolist(), cal_agree, args.budget)
            low = calibrate_threshold(conf.tolist(), cal_agree, args.low_budget, args.low_confidence)[0]
            for rule, threshold in ((BOUND, entry["threshold"]), (POINT, point), (LOW, low)):
                rule_exits = rules.setdefault(rule, RuleExits({}, {}, {}))
                rule_exits.thresholds[k] = threshold
                answers = [False] * len(conf) if threshold is None else (conf >= threshold).tolist()
                rule_exits.rates[k] = sum(answers) / len(answers)
                rule_exits.outcomes[k] = (
                    [False] * len(probs)
                    if threshold is None
                    else (probs.max(dim=1).values >= threshold).tolist()
                )
                r = _evaluate(probs, want, ev_labels, threshold)
                agree = "-" if r["agree"] is None else f"{r['agree']:.3f} (n={r['exited']})"
                acc = "-" if r["acc"] is None else f"{r['acc']:.3f}"
                th = "none" if threshold is None else f"{threshold:.3f}"
                lines.append(
                    f"| {k} | {entry['name']} | {entry['head_agreement']:.3f} | {rule} | {th} "
                    f"| {100 * r['rate']:.1f}% | {agree} | {r['stream']:.3f} | {acc} |"
                )
        lines += [
            "",
            f"Threshold rules: `{BOUND}`: {_rule_budget(args, BOUND)} (the Wilson lower bound of the "
            f"calibration photos' exited answers); `{POINT}`: the point estimate at {args.budget} (for "
            f"comparison, not offered); `{LOW}`: {_rule_budget(args, LOW)}.",
        ]
        if not args.no_replay:
            lines += _replay_section(args, bundle, entries, heads, rules)
    if args.bottleneck:
        lines += _bottleneck_section(args, bundle, model, batch, labels, (train_i, cal_i, eval_i))
    lines += [
        "",
        f"Total wall time {time.perf_counter() - started:.0f} s.",
        "",
    ]
    text = "\n".join(lines) + "\n"
    if args.append and Path(args.out).exists():
        text = Path(args.out).read_text() + "\n" + text
    Path(args.out).write_text(text)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
