"""``make loadtest``: compare split policies under load against a real local server.

1. Builds (once, cached under ``loadtests/.cache``) the bundle: EfficientNet-Lite0 with its
   real ImageNet weights, calibrated on real photos with a small codec set and profiled on
   this machine (``--model democnn``: the small CNN of ``splitinfer demo``, a minute instead
   of about ten on a shared 2-core machine);
2. records its frontiers (``splitinfer loadtest prepare``), also cached;
3. starts ``splitinfer serve`` on a free port of 127.0.0.1 and waits until it is ready;
4. runs locust headless for ``--run-time`` seconds (``LOADTEST_RUN_TIME``, default 150) with
   the load shape ``--shape`` (``LOADTEST_SHAPE``, default ramp), as one process or as a
   master with ``--workers`` workers;
5. stops the server and writes into ``--out`` (default ``loadtests/results``): locust's CSVs
   and HTML report, ``mix.json``, ``run.json``, ``summary.md`` and ``latency.png``.

Run: ``make loadtest`` or ``.venv/bin/python loadtests/run.py --help``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import report  # loadtests/ is on the path when this file runs

HERE = Path(__file__).resolve().parent

CACHE = HERE / ".cache"
RESULTS = HERE / "results"
#: Codecs of the load-test bundle: the lossless pair every bundle offers, f16 and q8. Fidelity
#: measurement costs one tail per cut and lossy family, so fewer families compile faster.
CODECS = ("f32", "f32+zstd1", "f16+zstd1", "q8+zstd1")
CALIBRATION_IMAGES = 8


def build_bundle(model: str, repo: Path) -> Path:
    """The model's bundle under ``repo``: compiled with calibration and a profile, once."""
    target = repo / model
    if (target / "manifest.json").exists():
        return target
    import torch

    from splitinfer.lab import compile_on_photos, demo_model, efficientnet_lite0

    t0 = time.perf_counter()
    if model == "efficientnet-lite0":
        net, size = efficientnet_lite0(), 224
    elif model == "democnn":
        net, size = demo_model(seed=0), 32
    else:
        raise SystemExit(f"unknown --model {model!r}: efficientnet-lite0 or democnn")
    # One thread, as each of the server's compute threads runs: on a shared machine more OpenMP
    # threads than free cores make the profile 10-30 times slower than the server really is.
    torch.set_num_threads(1)
    print(f"compiling {model} with {len(CODECS)} codecs on {CALIBRATION_IMAGES} real photos (cached after)")
    bundle = compile_on_photos(
        net, name=model, image_size=size, calibration=CALIBRATION_IMAGES, seed=3, codecs=CODECS, profile=True
    )
    tmp = repo / f".{model}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        bundle.save(tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"compiled, calibrated and profiled {model} in {time.perf_counter() - t0:.0f} s")
    return target


def build_recording(bundle_dir: Path, out: Path, samples: int) -> Path:
    if out.exists() and out.stat().st_mtime >= (bundle_dir / "manifest.json").stat().st_mtime:
        return out
    from splitinfer.lab import format_summary, prepare

    print(format_summary(prepare(bundle_dir, out, samples=samples, progress=False)))
    return out


def run_locust(args: argparse.Namespace, url: str, recording: Path, out: Path) -> int:
    """Locust, headless, as one process or a master with ``args.workers`` local workers."""
    env = {**os.environ, "SPLITLOAD_SHAPE": "" if args.shape == "constant" else args.shape}
    common = ["-f", str(HERE / "locustfile.py")]
    master = [
        sys.executable,
        "-m",
        "locust",
        *common,
        "--headless",
        "--host",
        url,
        "--recording",
        str(recording),
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        f"{args.run_time}s",
        "--stop-timeout",
        "30",
        "--interval",
        str(args.interval),
        "--csv",
        str(out / "locust"),
        "--csv-full-history",
        "--html",
        str(out / "report.html"),
        "--splitload-out",
        str(out / "mix.json"),
        "--only-summary",
        "--loglevel",
        "WARNING",
    ]
    if args.fleet:
        master += ["--fleet", args.fleet]
    workers = []
    if args.workers:
        master += [
            "--master",
            "--expect-workers",
            str(args.workers),
            "--master-bind-port",
            str(args.master_port),
        ]
        for _ in range(args.workers):
            cmd = [
                sys.executable,
                "-m",
                "locust",
                *common,
                "--worker",
                "--master-port",
                str(args.master_port),
            ]
            workers.append(subprocess.Popen([*cmd, "--loglevel", "WARNING"], env=env))
    try:
        with (out / "locust.log").open("w") as log:
            code = subprocess.run(master, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    finally:
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
    return code


def machine() -> str:
    cores = os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.machine()}, {cores} cores, Python {platform.python_version()}, load average {load}"


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=env("LOADTEST_MODEL", "efficientnet-lite0"))
    parser.add_argument("--run-time", type=int, default=int(env("LOADTEST_RUN_TIME", "150")), help="seconds")
    parser.add_argument("--users", type=int, default=int(env("LOADTEST_USERS", "40")), help="peak devices")
    parser.add_argument("--spawn-rate", type=float, default=5.0, help="devices started per second")
    parser.add_argument(
        "--shape",
        default=env("LOADTEST_SHAPE", "ramp"),
        choices=["ramp", "step", "spike", "diurnal", "constant"],
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between a device's requests")
    parser.add_argument(
        "--fleet", default=env("LOADTEST_FLEET", ""), help="NETWORK:SLOWDOWN,... (default: the locustfile's)"
    )
    parser.add_argument(
        "--workers", type=int, default=int(env("LOADTEST_WORKERS", "0")), help="0: one process"
    )
    parser.add_argument("--master-port", type=int, default=5557)
    parser.add_argument("--samples", type=int, default=4, help="real inputs recorded per (cut, codec)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `splitinfer serve` option")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=Path(env("LOADTEST_OUT", str(RESULTS))))
    parser.add_argument("--note", default=env("LOADTEST_NOTE", ""), help="a line for the summary")
    parser.add_argument(
        "--url",
        default=env("LOADTEST_URL", ""),
        help="send to this server (e.g. `make cluster`'s balancer, serving this cache's repo) "
        "instead of starting one",
    )
    parser.add_argument(
        "--build-bundle",
        type=Path,
        metavar="REPO",
        help="only compile the model's bundle into the repository REPO (what `make cluster` serves)",
    )
    args = parser.parse_args(argv)
    if args.build_bundle:
        args.build_bundle.mkdir(parents=True, exist_ok=True)
        build_bundle(args.model, args.build_bundle)
        return 0
    repo = args.cache / "repo"
    repo.mkdir(parents=True, exist_ok=True)
    bundle_dir = build_bundle(args.model, repo)
    recording = build_recording(bundle_dir, args.cache / f"{args.model}.rec", args.samples)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("locust*"):
        old.unlink()
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    static = _static(recording)
    started = datetime.datetime.now(datetime.timezone.utc)
    print(
        f"load test: {args.model}, {args.shape} to {args.users} devices for {args.run_time} s -> {args.out}"
    )
    from splitinfer.errors import SplitInferError
    from splitinfer.lab import ServerProcess

    if args.url:
        code = run_locust(args, args.url.rstrip("/"), recording, args.out)
    else:
        server = ServerProcess(repo, *args.server_arg, log=args.out / "server.log", stop_timeout_s=40.0)
        try:
            server.start()
        except SplitInferError as exc:
            raise SystemExit(f"the server did not start: {exc}") from None
        try:
            code = run_locust(args, server.url, recording, args.out)
        finally:
            server.stop()
    run: dict[str, Any] = {
        "model": args.model,
        "cuts": len(manifest["cuts"]),
        "codecs": manifest["codecs"],
        "started": started.isoformat(timespec="seconds"),
        "run_time_s": args.run_time,
        "shape": args.shape,
        "users": args.users,
        "interval_s": args.interval,
        "workers": args.workers,
        "static": static,
        "machine": machine(),
        "note": args.note,
        "locust_exit": code,
    }
    (args.out / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    names = {c["index"]: c["name"] for c in manifest["cuts"]}
    summary = report.write_summary(args.out, names)
    report.write_plot(args.out)
    print(summary.read_text())
    return code


def _static(recording: Path) -> str:
    from splitinfer.lab import Recording

    static = Recording(recording).static
    return "-" if static is None else f"{static[0]} {static[1]}"


if __name__ == "__main__":
    sys.exit(main())
