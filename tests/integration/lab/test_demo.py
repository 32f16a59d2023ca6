"""``splitinfer demo``: the real CLI in a subprocess (server, link emulators, edge clients), and its parts."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from splitinfer.errors import ConfigError
from splitinfer.lab._demo import POLICIES, DemoConfig, stretch
from splitinfer.lab._hindsight import Link
from splitinfer.lab._live import HINDSIGHT
from splitinfer.lab._report import Record, format_table, summarize
from splitinfer.netem import BandwidthTrace

CLI = [sys.executable, "-m", "splitinfer", "demo", "--quick", "--no-progress"]
ROW = re.compile(
    r"^(?P<policy>[\w-]+)\s+(?P<n>\d+)\s+(?P<mean>\d+)\s+(?P<p95>\d+)\s+(?P<ratio>[\d.]+)\s+(?P<kib>[\d.]+)\s+"
    r"(?P<agree>[\d.]+)%\s+(?P<fallbacks>\d+)\s+(?P<shares>\d+%/\d+%/\d+%)\s+(?P<mix>.+)$"
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo-cache")


def _table(stdout: str) -> dict[str, re.Match[str]]:
    return {m["policy"]: m for m in map(ROW.match, stdout.splitlines()) if m}


@pytest.mark.slow
def test_the_default_demo_is_a_deployment_and_its_report_says_so(tmp_path, cache):
    """Three devices of different speeds on different real trace stretches, a tenant that makes
    the cloud busy halfway, and a static tuned on what the run does not replay."""
    from splitinfer.lab._demo import DEPLOYMENT_TRACES

    out_dir = tmp_path / "report"
    proc = subprocess.run(
        [*CLI, "--duration", "5", "--out", str(out_dir), "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _table(proc.stdout)
    assert set(rows) == set(POLICIES), proc.stdout
    assert rows["local"]["shares"] == "100%/0%/0%" and rows["cloud"]["shares"] == "0%/0%/100%"
    text = (out_dir / "report.md").read_text()
    assert "scenario: a deployment" in text
    devices = re.findall(
        r"^- device (\d+): (\d+)x slower than this machine .* link (\S+) from (\d+) s for 5 s", text, re.M
    )
    assert [int(d[0]) for d in devices] == [1, 2, 3], text
    assert [d[2] for d in devices] == list(DEPLOYMENT_TRACES)
    slowdowns = [int(d[1]) for d in devices]
    assert slowdowns == sorted(slowdowns) and slowdowns[-1] >= 8 * slowdowns[0]  # 16x apart
    tenant = re.search(r"tenant sends .* at 0 -> (\d+) -> 0 requests/s, busiest at 2.5 s \((\d+) sent", text)
    assert tenant and int(tenant[1]) > 0 and int(tenant[2]) > 0, text
    static = re.search(
        r"^- static: .*chosen at deploy time: least mean latency at the median device over (.*); not tuned",
        text,
        re.M,
    )
    assert static, text
    # The static's tuning links: every run trace appears only with its run stretch left out.
    for _, _, name, start in devices:
        tuned = re.search(
            re.escape(name) + r" from (\d+) s for (\d+) s \(all of it but the run's 5 s from (\d+) s\)",
            static[1],
        )
        assert tuned, static[1]
        assert int(tuned[3]) == int(start) and int(tuned[1]) == int(start) + 5
    for policy in POLICIES:
        assert f"| {policy} |" in text
    lines = (out_dir / "requests.csv").read_text().splitlines()
    assert len(lines) - 1 == sum(int(m["n"]) for m in rows.values())


def test_a_deploy_time_static_is_not_tuned_on_the_run():
    from splitinfer.lab._demo import tuning_links

    links = tuning_links([("norway-3g-train-1", 30.0)], 60.0, ["norway-3g-train-1", "norway-3g-bus-1"])
    whole = BandwidthTrace.load("norway-3g-train-1")
    (train, span, label), (_, bus_span, bus_label) = links
    assert span == pytest.approx(whole.period - 60.0) and "all of it but the run's 60 s from 30 s" in label
    for t in np.arange(0.0, span, 0.5):  # the tuning link is the trace from 90 s on, up to 30 s again
        s0 = (90.0 + t) % whole.period
        assert float(train.done(t, 2e5)) - t == pytest.approx(whole.finish_time(s0, 2e5) - s0, abs=0.01)
    assert (
        bus_label == "norway-3g-bus-1 (whole)" and bus_span == BandwidthTrace.load("norway-3g-bus-1").period
    )
    with pytest.raises(ConfigError, match="too short"):
        tuning_links([("fcc-hsdpa-ferry-10-part0", 0.0)], 60.0, ["fcc-hsdpa-ferry-10-part0"])


@pytest.mark.slow
def test_quick_single_demo_prints_every_policy_and_writes_the_report(tmp_path, cache):
    out_dir = tmp_path / "report"
    proc = subprocess.run(
        [*CLI, "--scenario", "single", "--duration", "6", "--out", str(out_dir), "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _table(proc.stdout)
    assert set(rows) == {*POLICIES, HINDSIGHT}, proc.stdout  # and the hindsight-tuned static, named so
    for m in rows.values():
        assert int(m["n"]) >= 1
        assert 0 < int(m["mean"]) < 10_000 and 0 < int(m["p95"]) < 20_000
        assert math.isfinite(float(m["ratio"])) and float(m["ratio"]) > 0
        assert 0 <= float(m["agree"]) <= 100
        assert abs(sum(int(x) for x in re.findall(r"\d+", m["shares"])) - 100) <= 2  # rounding
    assert rows["local"]["shares"] == "100%/0%/0%" and float(rows["local"]["kib"]) == 0
    assert rows["cloud"]["shares"] == "0%/0%/100%" and float(rows["cloud"]["kib"]) > 0
    assert float(rows["local"]["agree"]) == 100.0  # nothing lossy on the device
    report = out_dir / "report.md"
    assert f"report: {report.resolve()}" in proc.stdout
    text = report.read_text()
    assert "chosen at deploy time" in text and "no deployment has that baseline" in text
    for policy in (*POLICIES, HINDSIGHT):
        assert f"| {policy} |" in text
    for plot in ("latency.png", "cuts.png"):
        assert (out_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({plot})" in text
    lines = (out_dir / "requests.csv").read_text().splitlines()
    assert lines[0].startswith("policy,t,latency_s,cut,codec")
    assert len(lines) - 1 == sum(int(m["n"]) for m in rows.values())


@pytest.mark.slow
def test_ctrl_c_stops_the_demo_and_everything_it_started(tmp_path, cache):
    proc = subprocess.Popen(
        [*CLI, "--duration", "120", "--out", str(tmp_path / "report"), "--cache-dir", str(cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a child inherits an ignored SIGINT, and then Python installs no
        # KeyboardInterrupt handler (seen in the full suite: the demo ignored the Ctrl-C).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    server_pid = None
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the demo exited before it ran"
            match = re.search(r"splitinfer serve \(pid (\d+)\)", line)
            if match:
                server_pid = int(match.group(1))
            if line.startswith("policies:"):
                break
        assert server_pid is not None and _alive(server_pid)
        time.sleep(1.5)  # requests in flight through the emulators
        proc.send_signal(signal.SIGINT)
        try:  # communicate, not wait: a demo blocked on a full stderr pipe would never exit
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
            pytest.fail(f"the demo did not stop within 60 s of Ctrl-C; its stderr ends:\n{stderr[-3000:]}")
        assert proc.returncode == 130, stderr[-3000:]
        assert "interrupted" in stderr and "Traceback" not in stderr, stderr
        deadline = time.monotonic() + 10
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(server_pid), "the cloud server outlived the demo"
        assert not (tmp_path / "report").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if server_pid is not None and _alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(") ", 1)[1].startswith("Z"))


async def test_an_answer_that_arrives_in_pieces_is_read_whole():
    """Through a slow link the answer comes in many reads; the edge must read to its end."""
    from aiohttp import web

    from splitinfer.edge._transport import HttpTransport
    from splitinfer.netem import LinkEmulator

    body = bytes(range(256)) * 256

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body)

    app = web.Application()
    app.router.add_post("/x", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        upstream = ("127.0.0.1", runner.addresses[0][1])
        async with LinkEmulator(upstream, uplink=BandwidthTrace.constant(4e6)) as emulator:
            transport = HttpTransport(f"http://127.0.0.1:{emulator.port}")
            try:
                resp = await transport.post("/x", b"hi", {}, 10.0)
            finally:
                await transport.close()
                emulator.disconnect_all()
        assert resp.status == 200 and resp.body == body
    finally:
        await runner.cleanup()


def test_a_stretch_is_the_trace_started_later():
    trace = BandwidthTrace((0.0, 1.0, 2.5), (1e6, 2e6, 3e6), 4.0, "t")
    later = stretch(trace, 1.5)
    assert later.period == trace.period
    for t in np.arange(0.0, 8.0, 0.25):
        assert later.rate_at(t) == trace.rate_at(t + 1.5)
    assert stretch(trace, 0.0) is trace
    assert stretch(trace, 5.5).rate_at(0.2) == trace.rate_at(1.7)


def test_the_oracles_link_matches_the_emulators_trace():
    trace = BandwidthTrace((0.0, 1.0, 2.5), (1e6, 0.0, 3e6), 4.0, "t")
    link = Link.from_trace(trace, horizon_s=30)
    for start, bits in [(0.0, 5e5), (0.5, 2e6), (3.9, 1e7), (12.2, 4e6)]:
        assert float(link.done(start, bits)) == pytest.approx(trace.finish_time(start, bits), abs=0.01)


def test_summary_and_table_of_records():
    def rec(policy, latency, cut, fallback="", agree=True):
        return Record(
            policy, 0.0, latency, cut, "q8+zstd1", 100 if cut < 4 else 0, 10, fallback, agree, 0.1, 0.1, 0.1
        )

    records = [
        rec("adaptive", 0.1, 2),
        rec("adaptive", 0.3, 4),
        rec("local", 0.2, 4),
        rec("local", 0.2, 2, "deadline"),
    ]
    s = summarize(records, last_cut=4, policies=["adaptive", "local", "cloud"])
    assert list(s) == ["adaptive", "local"]
    assert s["adaptive"].mean_s == pytest.approx(0.2) and s["adaptive"].split == 0.5
    assert s["local"].local == 1.0 and s["local"].fallbacks == 1
    assert s["adaptive"].vs_oracle == pytest.approx(2.0)
    table = format_table(s)
    assert table.splitlines()[2].split()[:4] == ["adaptive", "2", "200", "290"]


def test_every_device_counts_equally_in_a_summary(tmp_path):
    """A closed-loop run: a policy slow on one device sends fewer requests there. Pooled with equal
    weights, that device would hardly count (here: mean 1.8 s, p95 1 s); each device counting
    equally, its mean is the devices' mean and its p95 is the slow device's."""

    def rec(latency, device):
        return Record("local", 0.0, latency, 4, "f32", 0, 10, "", True, 0.1, 0.1, 0.1, device=device)

    records = [rec(1.0, 0) for _ in range(10)] + [rec(10.0, 1)]
    s = summarize(records, last_cut=4, policies=["local"])["local"]
    assert s.requests == 11
    assert s.mean_s == pytest.approx(5.5) and s.p95_s == pytest.approx(10.0)
    assert s.oracle_mean_s == pytest.approx(0.1)
    one = summarize([rec(1.0, 0), rec(3.0, 0)], last_cut=4, policies=["local"])["local"]
    assert one.mean_s == pytest.approx(2.0) and one.p95_s == pytest.approx(2.9)  # as before: unweighted


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"model": "resnet"}, "model must be one of"),
        ({"scenario": "fleet"}, "--scenario must be one of"),
        ({"duration_s": 0}, "--duration"),
        ({"slowdown": 0.5}, "--slowdown"),
        ({"budget": 1.5}, "--budget"),
        ({"policies": ("adaptive", "best")}, "policies must be among"),
    ],
)
def test_bad_settings_say_what_to_fix(kw, match):
    with pytest.raises(ConfigError, match=match):
        DemoConfig(**kw)
