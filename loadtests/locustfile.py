"""Locust users that emulate edge devices running split policies against a real server.

Each user is one device: it owns a policy (its class: ``AdaptiveDevice``, ``NeurosurgeonDevice``,
``CloudDevice``, ``LocalDevice``, ``StaticDevice``), a device slowdown and a network (a named
profile or a shipped bandwidth trace), assigned round-robin from ``--fleet``. Per request it

1. decides with the real policy from its own real estimator (``splitinfer.partitioner``);
2. waits out its emulated head and encode compute: the bundle's profiled time at that cut,
   times its slowdown, with 10% log-normal jitter (gevent sleep);
3. waits out half the round trip and its uplink: the request's real byte count through the
   bandwidth trace, integrated exactly, from where the device is in its trace;
4. sends the real encoded frontier (recorded by ``splitinfer loadtest prepare``) in a real
   request frame to the real server, and reads the answer;
5. waits out the other half of the round trip and the answer's downlink;
6. feeds what it observed (head time, transfer times, ``Server-Timing``) to its estimator,
   and probes the link (emulated) when the estimator asks, as docs/decision.md describes.

A request that the policy keeps on the device (the last cut) costs only step 2 and sends
nothing. Each request is reported once, with its end-to-end time, under the policy's name (type
``infer``), so locust's table compares policies directly; ``--name-by cut`` names them
``adaptive cut=12 q8+zstd1`` instead. The cut, codec and server compute time of every request
also go to the ``--splitload-out`` JSON (merged from workers on the master), which
``loadtests/report.py`` turns into the cut and codec mix.

The process imports the real modules (``splitinfer.protocol``, ``splitinfer.partitioner``'s
decision side, ``splitinfer.netem``, the lab's recording reader), none of which loads torch
(tests/integration/loadtests/test_loadtest.py checks it). Run it with ``loadtests/run.py`` or
``python -m locust -f loadtests/locustfile.py --headless --host URL --recording FILE ...``
(loadtests/README.md, also for distributed runs).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import random
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import gevent
from geventhttpclient import HTTPClient
from locust import User, events, task
from locust.runners import MasterRunner, WorkerRunner
from shapes import SHAPES

from splitinfer import netem, protocol
from splitinfer.errors import ConfigError
from splitinfer.lab import Recording
from splitinfer.partitioner import CostModel, Estimates, Estimator, make_policy

#: Policies compared, in the order the reports list them.
POLICIES = ("adaptive", "neurosurgeon", "cloud", "static", "local")
DEFAULT_FLEET = "3g:8,lte:8,wifi:8,norway-3g-train-1:8,fcc-hsdpa-ferry-10-part0:8,3g:24,wifi:24"
#: One-way delay of a device on a trace (the traces give bandwidth only): 40 ms (80 ms RTT).
TRACE_DELAY_S = 0.04
JITTER = 0.1


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("splitinfer load test")
    group.add_argument(
        "--recording",
        default="",
        help="recording from `splitinfer loadtest prepare` (a worker's own SPLITLOAD_RECORDING wins)",
    )
    group.add_argument(
        "--fleet",
        default=DEFAULT_FLEET,
        help="devices, round-robin per policy: NETWORK:SLOWDOWN,... where NETWORK is a profile "
        "(3g, lte, wifi, 5g) or a shipped trace",
    )
    group.add_argument("--interval", type=float, default=1.0, help="seconds between a device's requests")
    group.add_argument("--budget", type=float, default=0.99, help="fidelity budget of adaptive and cloud")
    group.add_argument("--name-by", choices=["policy", "cut"], default="policy", help="request names")
    group.add_argument("--splitload-out", default="", help="JSON of cut/codec mix and server compute")


# -- what a process shares: the recording, the cost model, the tally -------------------------


@dataclass(frozen=True)
class Network:
    name: str
    uplink: Any  # BandwidthTrace
    downlink: Any
    delay_s: float


def parse_fleet(text: str) -> list[tuple[Network, float]]:
    fleet = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, slowdown = item.rpartition(":")
        if not name or not _is_number(slowdown) or float(slowdown) < 1:
            raise ConfigError(f"--fleet takes NETWORK:SLOWDOWN items such as 3g:8, got {item!r}")
        profile = netem.PROFILES.get(name)
        if profile is not None:
            trace = netem.BandwidthTrace
            net = Network(
                name,
                trace.constant(profile.uplink_bps),
                trace.constant(profile.downlink_bps),
                profile.delay_s,
            )
        else:
            up = netem.BandwidthTrace.load(name)
            net = Network(name, up, up, TRACE_DELAY_S)
        fleet.append((net, float(slowdown)))
    if not fleet:
        raise ConfigError("--fleet is empty")
    return fleet


def transfer_s(trace: Any, start: float, bits: float) -> float:
    """Seconds a link following ``trace`` (a BandwidthTrace), free at trace time ``start``,
    takes to send ``bits``: its rates integrated exactly, looped.

    The same integral as ``BandwidthTrace.finish_time``, stepping by segment index rather than
    by accumulated time: ``finish_time`` can loop forever once its time runs past the trace's
    period (``t += span`` stops moving ``t`` when ``span`` is below its float resolution).
    """
    times, rates, period = trace.times, trace.rates_bps, trace.period
    phase = start % period
    i = bisect.bisect_right(times, phase) - 1
    whole = trace.mean_bps() * period
    loops = int(bits // whole) if whole > 0 else 0
    elapsed, bits = loops * period, bits - loops * whole
    while bits > 1e-9:
        end = times[i + 1] if i + 1 < len(times) else period
        span, rate = max(0.0, end - phase), rates[i]
        if rate * span >= bits:
            return elapsed + bits / rate
        bits -= rate * span
        elapsed += span
        i = (i + 1) % len(times)
        phase = times[i]
    return elapsed


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


class Shared:
    """Per process: the recording and cost model, loaded on the first device's start."""

    _lock = threading.Lock()
    recording: Any = None
    model: Any = None
    fleet: ClassVar[list[tuple[Network, float]]] = []

    @classmethod
    def get(cls, options: Any) -> type[Shared]:
        with cls._lock:
            if cls.recording is None:
                path = os.environ.get("SPLITLOAD_RECORDING") or getattr(options, "recording", "")
                if not path:
                    raise ConfigError("give --recording FILE (from `splitinfer loadtest prepare`)")
                cls.recording = Recording(path)
                cls.model = CostModel(cls.recording.bundle)
                cls.fleet = parse_fleet(getattr(options, "fleet", DEFAULT_FLEET))
        return cls


class Tally:
    """Counts per (policy, cut, codec): requests, failures, server compute, bytes, predictions."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = defaultdict(Counter)  # type: ignore[arg-type]
        self.events: Counter[str] = Counter()
        #: Whether any worker reported having imported torch.
        self.workers_torch = False

    def add(self, key: str, **values: float) -> None:
        row = self.rows[key]
        for k, v in values.items():
            row[k] += v

    def merge(self, data: dict[str, Any]) -> None:
        for key, row in data.get("rows", {}).items():
            self.add(key, **row)
        self.events.update(data.get("events", {}))
        self.workers_torch |= bool(data.get("torch", False))

    def take(self) -> dict[str, Any]:
        data = {
            "rows": {k: dict(v) for k, v in self.rows.items()},
            "events": dict(self.events),
            "torch": "torch" in sys.modules,
        }
        self.rows.clear()
        self.events.clear()
        return data

    def to_json(self) -> dict[str, Any]:
        rows = []
        for key, row in sorted(self.rows.items()):
            policy, cut, codec = key.split("|")
            rows.append({"policy": policy, "cut": int(cut), "codec": codec, **row})
        # Whether this process (and, in a distributed run, every worker) stayed without torch.
        process = {"torch": "torch" in sys.modules or self.workers_torch}
        return {"rows": rows, "events": dict(self.events), "process": process}


TALLY = Tally()


@events.request.add_listener
def _tally(
    context: dict[str, Any] | None = None, exception: Any = None, response_time: float = 0, **_: Any
) -> None:
    if not context or "policy" not in context:
        return
    key = f"{context['policy']}|{context['cut']}|{context['codec']}"
    TALLY.add(
        key,
        requests=1,
        failures=int(exception is not None),
        sent=int(context["sent"]),
        latency_s=response_time / 1000,
        predicted_s=context["predicted_s"] if math.isfinite(context["predicted_s"]) else 0.0,
        compute_s=context.get("compute_s", 0.0),
        queue_s=context.get("queue_s", 0.0),
        server_s=context.get("server_s", 0.0),
        bytes_up=context.get("bytes_up", 0),
    )


@events.report_to_master.add_listener
def _to_master(client_id: str, data: dict[str, Any]) -> None:
    data["splitload"] = TALLY.take()


@events.worker_report.add_listener
def _from_worker(client_id: str, data: dict[str, Any]) -> None:
    TALLY.merge(data.get("splitload", {}))


@events.quitting.add_listener
def _write_tally(environment: Any, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    options = environment.parsed_options
    out = getattr(options, "splitload_out", "")
    if out:
        data = TALLY.to_json()
        data["settings"] = {k: getattr(options, k, None) for k in ("fleet", "interval", "budget", "name_by")}
        Path(out).write_text(json.dumps(data, indent=1) + "\n")


@events.test_start.add_listener
def _check(environment: Any, **_: Any) -> None:
    """Fail fast: a bad fleet (or, in a local run, recording) shows before any device starts."""
    if isinstance(environment.runner, MasterRunner):
        parse_fleet(getattr(environment.parsed_options, "fleet", DEFAULT_FLEET))
    elif not isinstance(environment.runner, WorkerRunner):
        Shared.get(environment.parsed_options)


# -- the device ----------------------------------------------------------------------------------


class NotRecordedError(LookupError):
    """The policy chose a (cut, codec) that the recording lacks."""


class Device(User):
    """One emulated edge device (abstract: the subclasses fix the policy)."""

    abstract = True
    policy_name: ClassVar[str] = ""
    _count: ClassVar[int] = 0

    def wait_time(self) -> float:
        """Constant pacing: one request every ``--interval`` seconds, or at once if late."""
        return max(0.0, self.next_at - time.perf_counter())

    def on_start(self) -> None:
        options = self.environment.parsed_options
        shared = Shared.get(options)
        self.recording, self.model = shared.recording, shared.model
        bundle = self.recording.bundle
        number = type(self)._count
        type(self)._count += 1
        self.network, self.slowdown = shared.fleet[number % len(shared.fleet)]
        # The i-th device of every policy gets the same network, slowdown and trace phase.
        self.rng = random.Random(number)
        self.phase = self.rng.uniform(0, self.network.uplink.period)
        self.interval = float(getattr(options, "interval", 1.0))
        self.name_by = getattr(options, "name_by", "policy")
        budget = float(getattr(options, "budget", 0.99))
        settings: dict[str, Any] = {}
        if self.policy_name in ("adaptive", "cloud"):
            settings["fidelity_budget"] = budget
        if self.policy_name == "adaptive":
            settings["seed"] = number
        if self.policy_name == "static":
            if self.recording.static is None:
                raise ConfigError("the recording names no static split; prepare it again")
            settings["cut"], settings["codec"] = self.recording.static
        self.policy = make_policy(self.policy_name, bundle, **settings)
        # The same policy without exploration: taken when exploration picks a pair too large to
        # have been recorded (`splitinfer loadtest prepare --explore-mib`), and counted.
        self.exact = None
        if self.policy_name == "adaptive":
            self.exact = make_policy(self.policy_name, bundle, **{**settings, "explore": 0.0})
        prior = replace(
            Estimates(uplink_bps=2e6, downlink_bps=8e6, rtt_s=0.05),
            device_slowdown=self.slowdown,
        )
        self.estimator = Estimator(bundle, prior=prior, clock=time.perf_counter)
        self.t0 = time.perf_counter()
        # The warm-up inference at start-up that docs/decision.md asks for.
        self.estimator.observe_head(bundle.last_cut, self._device_s(self.model.local))
        self.http = HTTPClient.from_url(
            self.host, concurrency=1, connection_timeout=10, network_timeout=60, headers={}
        )
        self.path = f"/v1/models/{bundle.name}/infer"
        # Devices start out of step, then keep their pace.
        self.next_at = self.t0 + self.rng.uniform(0, self.interval)
        gevent.sleep(self.next_at - time.perf_counter())

    def on_stop(self) -> None:
        self.http.close()

    # -- emulation -------------------------------------------------------------------------------

    def _jitter(self) -> float:
        return math.exp(self.rng.gauss(0.0, JITTER))

    def _device_s(self, row: int) -> float:
        """Emulated head + encode time of cost-model row ``row`` on this device."""
        return (float(self.model.head[row]) + float(self.model.encode[row])) * self.slowdown * self._jitter()

    def _link_s(self, trace: Any, nbytes: int) -> float:
        """Seconds to move ``nbytes`` over ``trace``, starting now (device clock + phase)."""
        return transfer_s(trace, time.perf_counter() - self.t0 + self.phase, nbytes * 8)

    def _row(self, cut: int, codec: str) -> int:
        if cut == self.model.n:
            return self.model.local
        return cut * len(self.model.codecs) + self.model.codecs.index(codec)

    # -- one request ---------------------------------------------------------------------------

    @task
    def infer(self) -> None:
        started = time.perf_counter()
        self.next_at = started + self.interval
        estimates = self.estimator.estimates()
        decision = self.policy.decide(estimates)
        if (
            decision.explored
            and decision.cut != self.model.n
            and (decision.cut, decision.codec) not in self.recording
        ):
            decision = self.exact.decide(estimates)
            TALLY.events[f"explore_unrecorded|{self.policy_name}"] += 1
        cut, codec = decision.cut, decision.codec
        last = cut == self.model.n
        context: dict[str, Any] = {
            "policy": self.policy_name,
            "cut": cut,
            "codec": "-" if last else codec,
            "sent": not last,
            "predicted_s": decision.predicted_s,
        }
        if self.name_by == "cut":
            name = f"{self.policy_name} cut={cut} {'on-device' if last else codec}"
        else:
            name = self.policy_name
        exception: Exception | None = None
        length = 0
        try:
            row = self._row(cut, codec)
            device_s = self._device_s(row)
            gevent.sleep(device_s)
            head, encode = float(self.model.head[row]), float(self.model.encode[row])
            if head > 0:
                self.estimator.observe_head(cut, device_s * head / (head + encode))
            if not last:
                length = self._send(cut, codec, context)
        except Exception as exc:  # reported to locust as this request's failure
            exception = exc
        self.environment.events.request.fire(
            request_type="infer",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=exception,
            context=context,
        )
        if self.policy_name not in ("local", "static") and self.estimator.needs_probe():
            self._probe()

    def _send(self, cut: int, codec: str, context: dict[str, Any]) -> int:
        if (cut, codec) not in self.recording:
            raise NotRecordedError(
                f"the policy chose cut {cut} {codec}, which the recording lacks: the estimates left "
                f"the grid `splitinfer loadtest prepare` covers"
            )
        frames = self.recording.frames(cut, codec)
        payload, tensors = frames[self.rng.randrange(len(frames))]
        bundle = self.recording.bundle
        header = protocol.RequestHeader(
            model=bundle.name,
            graph=bundle.graph_hash,
            cut=cut,
            codec=codec,
            tensors=tensors,
            request_id=uuid.uuid4().hex,
            payload_nbytes=len(payload),
        )
        body = protocol.encode_request(header, bytes(payload))
        context["bytes_up"] = len(body)
        rtt = 2 * self.network.delay_s * self._jitter()
        start = time.perf_counter()
        gevent.sleep(rtt / 2 + self._link_s(self.network.uplink, len(body)))
        resp = self.http.post(self.path, body=body, headers={"Content-Type": protocol.FRAME_CONTENT_TYPE})
        data = resp.read()
        timing = resp.get("Server-Timing")
        retry_after = resp.get("Retry-After")
        status = resp.status_code
        resp.release()
        gevent.sleep(rtt / 2)
        first_byte = time.perf_counter()
        gevent.sleep(self._link_s(self.network.downlink, len(data)))
        end = time.perf_counter()
        stages = protocol.parse_server_timing(timing)
        context.update(
            compute_s=stages.get("compute", 0.0),
            queue_s=stages.get("queue", 0.0),
            server_s=stages.get("total", 0.0),
        )
        if status != 200:
            raise protocol.error_from_problem(status, bytes(data), retry_after)
        self.estimator.observe_transfer(
            up_bytes=len(body),
            down_bytes=len(data),
            start=start,
            first_byte=first_byte,
            end=end,
            server_timing=timing,
            cut=cut,
        )
        return len(data)

    def _probe(self) -> None:
        """What the estimator asks for when its uplink estimate is stale: a tiny request for the
        round trip, then an upload of ``probe_bytes()`` (emulated on the device's link)."""
        rtt = 2 * self.network.delay_s * self._jitter()
        gevent.sleep(rtt)
        self.estimator.observe_rtt(rtt)
        nbytes = self.estimator.probe_bytes()
        seconds = self._link_s(self.network.uplink, nbytes)
        gevent.sleep(seconds)
        self.estimator.observe_upload(nbytes, seconds)
        TALLY.events[f"probes|{self.policy_name}"] += 1


def _device_class(policy: str) -> type[Device]:
    name = f"{policy.capitalize()}Device"
    return type(name, (Device,), {"policy_name": policy, "abstract": False, "__module__": __name__})


AdaptiveDevice = _device_class("adaptive")
NeurosurgeonDevice = _device_class("neurosurgeon")
CloudDevice = _device_class("cloud")
StaticDevice = _device_class("static")
LocalDevice = _device_class("local")

_shape = os.environ.get("SPLITLOAD_SHAPE", "").strip().lower()
if _shape:
    if _shape not in SHAPES:
        raise SystemExit(f"SPLITLOAD_SHAPE must be one of {', '.join(SHAPES)}, got {_shape!r}")
    Shape = SHAPES[_shape]
