"""What the edge currently believes about the world, and the estimator that keeps it current.

:class:`Estimates` is the input of every policy's ``decide``: rates in bits per second, times
in seconds, speeds as slowdown factors against the profile (2.0: twice as slow as the machine
the profile was measured on).

:class:`Estimator` is fed *passively* by what real requests reveal, and actively only when it
asks for a probe (:meth:`Estimator.needs_probe`):

- ``observe_transfer`` (bytes up and down, start, first byte of the answer, end, and the
  server's ``Server-Timing`` header) yields one sample each of the uplink rate, the round trip,
  the downlink rate, the cloud's queueing and the cloud's speed (its compute time against the
  profiled tail at that cut);
- ``observe_head`` (measured head time at a cut) and ``observe_device`` (any device work, such
  as an encode, with its profiled time) yield the device's speed against the profile; head
  times also correct the profile per cut (below);
- ``observe_upload`` / ``observe_download`` / ``observe_rtt`` take a probe's direct measurements.

The request's wait for its first answer byte is ``rtt + up_bytes / uplink + server``, with the
server's time read from its header. The round trip is the median of recent samples of
``wait - server - up_bytes / uplink`` taken from requests whose payload is predicted to take
less than a fifth of that and not above twice the current estimate (so a wrong uplink
estimate, such as one from before the link slowed down, barely moves it), and of probes
(``observe_rtt``: a tiny request), which is how it starts: one payload size alone cannot tell
a long round trip from a slow link. The uplink sample is then
``up_bytes / (wait - server - rtt)``.

Rates and speeds are tracked by :class:`LogEwma`: an exponentially weighted mean of the
logarithm, each sample weighted by how long it lasted or was predicted to last, whichever is
longer (``1 - exp(-duration / tau)``: a transfer of a few milliseconds, whose rate is mostly
timer noise and round-trip error, barely counts, unless it was expected to take long; a long
one counts almost fully) and clipped to a few mean absolute deviations of the current mean, so
a single outlier cannot swing the estimate while a lasting change still moves it within a few
samples. Queueing and the round trip are windowed medians.

The uplink that :meth:`Estimator.estimates` reports is ``exp(mean - risk * sd^2)``: with the
default ``risk=0.5``, the rate whose reciprocal is the expected reciprocal of a log-normal
rate, so that ``bytes / uplink`` predicts the *expected* transfer time rather than the time at
the typical rate (a fluctuating link costs large payloads more). It is further capped by the
requests still in flight (:meth:`Estimator.start_transfer`): a request that should have been
uploaded by now says the link is slower than believed, before it ends.

Idle periods: an estimate keeps its value, but its uncertainty (standard deviation of the log)
grows with its age, ``sqrt(dev^2 + drift * age)``. :meth:`Estimator.needs_probe` says when the
uplink estimate is older than ``probe_after_s``: a client that kept every request on the device
(because the link looked bad) then sends a small probe (``probe_bytes()``) so it notices when
the link comes back. :meth:`Estimator.needs_rtt_probe` says when the round trip has no sample
younger than ``rtt_probe_after_s``: requests whose upload dominates their wait never yield one,
and without a measured round trip every uplink sample absorbs the prior's error (a prior 30 ms
short made 15 KB uploads on a 2 Mbit/s link look 0.6x as fast as they were).
Per-cut head correction (issue 28): a profile taken on a busy machine can be wrong per segment,
10-100x both ways, and one device scalar cannot fix that: the head of cut 3 may be priced 3x
too high while cut 5's is 3x too low, and the scalar only learns their mixture, so the policy
keeps choosing the cut whose head the profile underprices. Each cut therefore keeps its own
correction, a running mean of ``log(observed / profiled)`` with a count (the first samples
averaged, later ones an exponentially weighted mean with weight ``head_alpha``, a sample more
than twice or half the mean clipped to that once the cut has three samples, so one paused
thread cannot swing it). A cut seen ``n`` times is priced at ``exp((n * mean + n0 * log(device))
/ (n + n0))`` times its profiled head (``n0 = head_prior_n``): a cut seen once is half trusted,
a cut seen a dozen times almost fully, and the device scalar is the prior. A cut never seen
borrows from its nearest observed neighbours: its corrected head is interpolated linearly over
the cumulative profiled time between the corrected heads of the observed cut before it (cut
0, whose head is nothing, always counts as one) and the one after it; past the last observed
cut, the profile's further segments are priced at the device scalar. Heads are cumulative, so
a cut between two observed ones shares most of its segments with them: interpolation is
exact where the profile's error is the same on the segments between them (the warm-up at the
last cut makes every cut "between" two observed ones from the start).

Cuts never tried: interpolation cannot see an error that alternates between two observed
cuts (a segment 3x overpriced followed by one 3x underpriced), and a cut priced too high is
never chosen, so never observed, so never corrected; the adaptive policy's exploration
(``explore``: 5 % of requests, among candidates within 10 % of the winner) finds it only
slowly (in a unit test, after 6 to over 60 requests). So a cut never observed is priced
optimistically: the segments since the observed cut before it at ``1 - head_optimism`` (half,
by default) of the interpolated rate, never below that cut's head (heads are cumulative, so
that is a hard lower bound). A cut whose optimistic price beats the winner is tried once and
priced from what it took from then on: at most one request per cut near the winner, paid
early. A cut priced above the winner even so is never tried, which costs nothing while the
winner is right.
:meth:`Estimator.estimates` reports the corrections as ``Estimates.head_slowdown`` (per cut);
the cost model prices head ``k`` at ``head_slowdown[k]`` and encodes at ``device_slowdown``.

Everything is thread-unsafe and clock-agnostic: pass times from one clock
(``time.monotonic`` by default, or ``now=`` for a simulation).
"""

from __future__ import annotations

import bisect
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from splitinfer._checks import check_number
from splitinfer.errors import ConfigError
from splitinfer.manifest import Manifest
from splitinfer.partitioner._profiles import chain_times, pick_profile
from splitinfer.protocol import parse_server_timing

__all__ = ["DEFAULT_PRIOR", "Estimates", "Estimator", "LogEwma"]


@dataclass(frozen=True)
class Estimates:
    """The state of the world a policy decides on.

    Rates are bits per second and must be positive (a link that is down is a tiny rate, not 0);
    times are non-negative seconds; slowdowns are positive factors applied to profiled times
    (``device_slowdown`` to head and encode, ``cloud_slowdown`` to decode and tail).
    ``uplink_sd`` is the uplink's uncertainty: the standard deviation of the logarithm of its
    rate (0: known exactly), which the ``p95`` objective and hedged requests price.
    """

    uplink_bps: float
    downlink_bps: float
    rtt_s: float
    cloud_queue_s: float = 0.0
    device_slowdown: float = 1.0
    cloud_slowdown: float = 1.0
    uplink_sd: float = 0.0
    #: Per cut ``0..n``, the slowdown the head of that cut is priced at (its measured time over
    #: its profiled time, :meth:`Estimator.head_slowdowns`); empty: ``device_slowdown`` for all.
    head_slowdown: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("uplink_bps", "downlink_bps", "device_slowdown", "cloud_slowdown"):
            check_number(f"Estimates.{name}", getattr(self, name), lo=0.0, lo_open=True)
        for k, factor in enumerate(self.head_slowdown):
            check_number(f"Estimates.head_slowdown[{k}]", factor, lo=0.0, lo_open=True)
        check_number("Estimates.uplink_sd", self.uplink_sd, lo=0.0)
        for name in ("rtt_s", "cloud_queue_s"):
            check_number(f"Estimates.{name}", getattr(self, name), lo=0.0, unit="seconds")


#: What an estimator believes before its first observation: a modest 3G-class link.
DEFAULT_PRIOR = Estimates(uplink_bps=1e6, downlink_bps=4e6, rtt_s=0.1)

_MIN_RATE = 1e3  # bits/s: an estimate never drops below this (the link is "down")
#: A request yields a round-trip sample only if its upload is predicted to take less than this
#: share of its wait, and the sample is at most twice the current round trip: otherwise an error
#: in the uplink estimate (a link that just slowed down, say) leaks into the round trip, and
#: from there back into the uplink (on the traces, 0.5 biased the uplink 20% high; 0.2 does not).
#: A round trip that really grew more than twofold is learnt from probes (``observe_rtt``).
_RTT_SAMPLE_SHARE = 0.2
_MAX_RATE = 1e12


class LogEwma:
    """A robust, duration-weighted running mean of ``log(x)`` for positive samples.

    ``update(x, duration)`` moves the mean by ``w * clip(log(x) - mean)`` with
    ``w = 1 - exp(-max(duration, min_duration) / tau)`` and the residual clipped to
    ``max(clip * dev, min_clip)`` (``dev``: running mean absolute residual). Change detection
    (``jump_after`` > 0): once ``jump_after`` consecutive samples fall beyond that clip on the same
    side, the link changed rather than misbehaved once: from then on every sample on that side of
    the mean (at any distance) is taken unclipped with ``tau * jump_tau``, until one falls on the
    other side. The first sample sets the mean. ``value`` is ``exp(mean)``; ``sd(age)`` the
    uncertainty of the log after ``age`` seconds without samples.
    """

    def __init__(
        self,
        *,
        tau: float,
        min_duration: float = 0.0,
        clip: float = 3.0,
        min_clip: float = math.log(2.0),
        drift: float = 0.01,
        jump_after: int = 0,
        jump_tau: float = 0.25,
    ):
        if tau <= 0:
            raise ConfigError(f"tau must be > 0 seconds, got {tau}")
        if jump_after < 0 or not 0 < jump_tau <= 1:
            raise ConfigError(f"jump_after must be >= 0 and jump_tau in (0, 1], got {jump_after}, {jump_tau}")
        self.tau = tau
        self.jump_after = jump_after
        self.jump_tau = jump_tau
        #: Consecutive samples on one side (+ above the mean, - below) beyond the clip, or, once
        #: ``jump_after`` of them were, at any distance.
        self.run = 0
        self.min_duration = min_duration
        self.clip = clip
        self.min_clip = min_clip
        self.drift = drift
        self.mean: float | None = None
        self.dev = 0.0
        self.count = 0
        self.last: float | None = None

    def update(self, x: float, duration: float, now: float) -> None:
        if not (x > 0 and math.isfinite(x)):
            return
        y = math.log(x)
        self.count += 1
        self.last = now
        if self.mean is None:
            self.mean = y
            self.dev = self.min_clip / self.clip
            return
        tau = self.tau
        residual = y - self.mean
        limit = max(self.clip * self.dev, self.min_clip)
        clipped = max(-limit, min(limit, residual))
        if self.jump_after:
            side = 1 if residual > 0 else -1
            beyond = abs(residual) > limit
            if self.run * side > 0 and (beyond or abs(self.run) >= self.jump_after):
                self.run += side  # still on the far side (once a jump, at any distance)
            else:
                self.run = side if beyond else 0
            if abs(self.run) >= self.jump_after:
                # A change, not an outlier: take the residual whole and react faster.
                clipped, tau = residual, tau * self.jump_tau
        d = max(duration, self.min_duration)
        self.mean += (1.0 - math.exp(-d / tau)) * clipped
        w = 1.0 - math.exp(-d / self.tau)  # the spread moves at the usual pace
        self.dev += w * (min(abs(residual), 2 * limit) - self.dev)

    def value(self, default: float) -> float:
        return default if self.mean is None else math.exp(self.mean)

    def age(self, now: float) -> float:
        return math.inf if self.last is None else max(0.0, now - self.last)

    def sd(self, now: float) -> float:
        if self.mean is None:
            return math.inf
        return math.sqrt(self.dev**2 + self.drift * self.age(now))


class _WindowMedian:
    """Median of the last ``size`` samples."""

    def __init__(self, size: int):
        self.samples: deque[float] = deque(maxlen=size)
        self.last: float | None = None

    def update(self, x: float, now: float) -> None:
        if math.isfinite(x):
            self.samples.append(x)
            self.last = now

    def value(self, default: float) -> float:
        return statistics.median(self.samples) if self.samples else default


class Estimator:
    """Online estimates of the link, the cloud and the device, fed by real transfers.

    ``bundle`` (its profile ``profile``, by default the one policies pick) is needed only to
    turn measured head and tail times into slowdown factors; without one, the slowdowns stay at
    ``prior``'s. ``tau_s`` is the rate estimators' time constant in seconds of transfer;
    ``risk`` how much the uplink's spread lowers the rate reported (0: the geometric mean; 0.5:
    the rate predicting the expected transfer time); ``probe_after_s`` how old the uplink
    estimate may grow before :meth:`needs_probe`, ``rtt_probe_after_s`` the round trip's
    newest sample before :meth:`needs_rtt_probe`; ``window`` the samples of the medians;
    ``jump_after`` the rates' change detection (:class:`LogEwma`: after that many consecutive
    samples beyond the outlier clip on one side, the estimate follows unclipped at a quarter of
    ``tau_s`` until a sample falls on the other side; 0, the default until the replay has
    measured it, turns it off). ``head_alpha`` is the weight of a new head time in its cut's
    correction once the cut has ``1 / head_alpha`` samples, ``head_prior_n`` how many samples
    the device scalar counts as in a cut's correction, ``head_optimism`` how much cheaper
    than its observed neighbours suggest a cut never observed is priced (module docstring).

    The edge should call :meth:`observe_head` once at start-up with a warm-up inference at the
    last cut, so that the device's speed is known before the first decision.
    """

    def __init__(
        self,
        bundle: Manifest | None = None,
        *,
        profile: str | None = None,
        prior: Estimates = DEFAULT_PRIOR,
        tau_s: float = 0.5,
        risk: float = 0.5,
        probe_after_s: float = 1.0,
        rtt_probe_after_s: float = 30.0,
        window: int = 15,
        jump_after: int = 0,
        head_alpha: float = 0.25,
        head_prior_n: float = 1.0,
        head_optimism: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ):
        check_number("head_alpha", head_alpha, lo=0.0, lo_open=True, hi=1.0)
        check_number("head_prior_n", head_prior_n, lo=0.0)
        check_number("head_optimism", head_optimism, lo=0.0, hi=1.0, hi_open=True)
        if probe_after_s <= 0 or rtt_probe_after_s <= 0:
            raise ConfigError(
                f"probe_after_s and rtt_probe_after_s must be > 0 seconds, got {probe_after_s}, "
                f"{rtt_probe_after_s}"
            )
        if window < 1:
            raise ConfigError(f"window must be >= 1 sample, got {window}")
        self.prior = prior
        self.risk = risk
        self.probe_after_s = probe_after_s
        self.rtt_probe_after_s = rtt_probe_after_s
        self.clock = clock
        self.uplink = LogEwma(tau=tau_s, min_duration=0.002, jump_after=jump_after)
        self.downlink = LogEwma(tau=tau_s, min_duration=0.002, jump_after=jump_after)
        self.device = LogEwma(tau=1.0, min_duration=0.1, drift=0.0)
        self.cloud = LogEwma(tau=1.0, min_duration=0.1, drift=0.0)
        self.rtt = _WindowMedian(window)
        self.queue = _WindowMedian(window)
        self._in_flight: dict[int, tuple[float, float]] = {}
        self._next_id = 0
        self._head_s: list[float] | None = None
        self._tail_s: list[float] | None = None
        self._response_bytes = 0.0
        self.head_alpha = head_alpha
        self.head_prior_n = head_prior_n
        self.head_optimism = head_optimism
        #: Per observed cut: the running mean of log(observed / profiled head), and its count.
        self.cut_heads: dict[int, tuple[float, int]] = {}
        if bundle is not None:
            picked, times = pick_profile(bundle, profile), chain_times(bundle, profile)
            if picked is not None and times is not None:
                self._head_s, self._tail_s = times
                self._response_bytes = float(picked[1].get("response_bytes", 0.0))

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    # -- observations ---------------------------------------------------------------------

    def observe_upload(self, nbytes: float, seconds: float, *, now: float | None = None) -> None:
        """A pure upload of ``nbytes`` that took ``seconds`` (no round trip in it)."""
        if nbytes > 0 and seconds > 0:
            self._rate_sample(self.uplink, nbytes * 8, seconds, self._now(now), self.prior.uplink_bps)

    def observe_download(self, nbytes: float, seconds: float, *, now: float | None = None) -> None:
        """A pure download of ``nbytes`` that took ``seconds``."""
        if nbytes > 0 and seconds > 0:
            self._rate_sample(self.downlink, nbytes * 8, seconds, self._now(now), self.prior.downlink_bps)

    def observe_rtt(self, seconds: float, *, now: float | None = None) -> None:
        """A measured round trip (e.g. a tiny probe request, minus the server's time)."""
        if seconds >= 0:
            self.rtt.update(seconds, self._now(now))

    def observe_head(
        self, cut: int, seconds: float, *, now: float | None = None, device: bool = True
    ) -> None:
        """The device took ``seconds`` to run the head of ``cut`` (the whole model at the last cut).

        Corrects that cut's head (module docstring) and, with ``device=True``, the device's
        speed; ``device=False`` for a caller that feeds the device's speed otherwise
        (:meth:`observe_device` with the head and the encode together)."""
        if self._head_s is None or not 0 <= cut < len(self._head_s):
            return
        profiled = self._head_s[cut]
        if profiled > 1e-5 and seconds > 0 and math.isfinite(seconds):
            y = math.log(seconds / profiled)
            mean, count = self.cut_heads.get(cut, (y, 0))
            count += 1
            residual = y - mean
            if count > 3:
                residual = max(-math.log(2.0), min(math.log(2.0), residual))
            mean += max(1.0 / count, self.head_alpha) * residual
            self.cut_heads[cut] = (mean, count)
        if device:
            self.observe_device(profiled, seconds, now=now)

    def head_slowdowns(self, device_slowdown: float | None = None) -> tuple[float, ...]:
        """Per cut ``0..n``, the factor its profiled head is priced at (module docstring); empty
        before any head was observed (then ``device_slowdown`` prices every head).
        ``device_slowdown``: the scalar to shrink toward, by default the current estimate."""
        heads = self._head_s
        if heads is None or not self.cut_heads:
            return ()
        ds = self.device.value(self.prior.device_slowdown) if device_slowdown is None else device_slowdown
        log_ds, n0 = math.log(ds), self.head_prior_n
        # anchors: (profiled, corrected) cumulative head at each observed cut; cut 0 is free
        anchors: dict[int, tuple[float, float]] = {0: (0.0, 0.0)}
        for cut, (mean, count) in self.cut_heads.items():
            shrunk = (count * mean + n0 * log_ds) / (count + n0)
            anchors[cut] = (heads[cut], heads[cut] * math.exp(shrunk))
        observed = sorted(anchors)
        factors = []
        for k, profiled in enumerate(heads):
            if profiled <= 1e-12:
                factors.append(ds)
                continue
            if k in anchors:
                factors.append(anchors[k][1] / profiled)
                continue
            i = bisect.bisect_left(observed, k)  # observed[i - 1] < k < observed[i]
            p0, c0 = anchors[observed[i - 1]]
            if i < len(observed):
                p1, c1 = anchors[observed[i]]
                rate = (c1 - c0) / (p1 - p0) if p1 > p0 else ds
                rate = max(0.0, rate) * (1.0 - self.head_optimism)  # never tried: optimistic (docstring)
            else:
                rate = ds
            corrected = c0 + (profiled - p0) * rate
            factors.append(corrected / profiled if corrected > 0 else ds)
        return tuple(factors)

    def observe_device(self, profiled_s: float, seconds: float, *, now: float | None = None) -> None:
        """The device took ``seconds`` for work the profile times at ``profiled_s`` (an encode,
        say: at cut 0 it is the only device work, and without it a device estimate that ran
        high would keep every request at cut 0, where it is never measured again)."""
        if profiled_s > 1e-5 and seconds > 0:
            self.device.update(seconds / profiled_s, profiled_s, self._now(now))

    def observe_server_timing(
        self, timing: str | Mapping[str, float] | None, *, cut: int | None = None, now: float | None = None
    ) -> dict[str, float]:
        """Queueing and cloud speed from a ``Server-Timing`` header (or its parsed stages).

        Returns the parsed stages in seconds. The cloud's slowdown is its ``compute`` time over
        the profiled tail at ``cut`` at batch 1 (so it also absorbs the cloud's batching).
        """
        stages = parse_server_timing(timing) if timing is None or isinstance(timing, str) else dict(timing)
        t = self._now(now)
        if "queue" in stages:
            self.queue.update(max(0.0, stages["queue"]), t)
        if cut is not None and self._tail_s is not None and 0 <= cut < len(self._tail_s):
            profiled = self._tail_s[cut]
            if profiled > 1e-5 and stages.get("compute", 0.0) > 0:
                self.cloud.update(stages["compute"] / profiled, profiled, t)
        return stages

    def start_transfer(
        self, up_bytes: float, start: float, *, cut: int | None = None, down_bytes: float | None = None
    ) -> int:
        """Note a request to ``cut`` whose upload of ``up_bytes`` began at ``start``; returns its id.

        Until it is finished (``observe_transfer(..., transfer_id=id)``), the uplink estimate
        is capped at the rate at which it would still be uploading once the round trip, the
        cloud's expected time (queue, and the profiled tail at ``cut``) and the answer's
        download (``down_bytes``, by default the profile's response size) are set aside: a
        link that went dead is noticed while its requests hang, not only when they end.
        """
        others = 0.0
        if cut is not None and self._tail_s is not None and 0 <= cut < len(self._tail_s):
            others += self._tail_s[cut] * self.cloud.value(self.prior.cloud_slowdown)
        down = self._response_bytes if down_bytes is None else down_bytes
        others += down * 8 / self.downlink.value(self.prior.downlink_bps)
        self._next_id += 1
        self._in_flight[self._next_id] = (up_bytes * 8, start + others)
        return self._next_id

    def cancel_transfer(self, transfer_id: int) -> None:
        """Forget a :meth:`start_transfer` whose request failed (it tells nothing about the link)."""
        self._in_flight.pop(transfer_id, None)

    def observe_transfer(
        self,
        *,
        up_bytes: float,
        down_bytes: float,
        start: float,
        first_byte: float,
        end: float,
        server_timing: str | Mapping[str, float] | None = None,
        cut: int | None = None,
        transfer_id: int | None = None,
    ) -> None:
        """One request: ``up_bytes`` sent from ``start``; the answer's first byte at
        ``first_byte``, its last (``down_bytes`` in all) at ``end``; times on this estimator's
        clock. See the module docstring for how it is decomposed. ``transfer_id`` finishes a
        :meth:`start_transfer` (:meth:`cancel_transfer` ends one whose request failed)."""
        if transfer_id is not None:
            self._in_flight.pop(transfer_id, None)
        if not start <= first_byte <= end:
            raise ConfigError(
                f"a transfer needs start <= first_byte <= end, got {start}, {first_byte}, {end}"
            )
        stages = self.observe_server_timing(server_timing, cut=cut, now=end)
        server = stages.get("total")
        if server is None:
            server = sum(stages.get(k, 0.0) for k in ("queue", "decode", "compute", "encode"))
        wait = max(0.0, first_byte - start - server)
        bits = up_bytes * 8
        predicted_up = bits / self.uplink.value(self.prior.uplink_bps)
        rtt = self.rtt.value(self.prior.rtt_s)
        sample = wait - predicted_up
        if predicted_up < _RTT_SAMPLE_SHARE * wait and sample <= 2 * rtt:
            self.rtt.update(sample, end)
            rtt = self.rtt.value(self.prior.rtt_s)
        if up_bytes > 0:
            up_s = wait - rtt
            if up_s <= 0:
                # Faster than the round-trip estimate allows: evidence of a fast link, timed poorly.
                up_s = max(wait * 0.1, 1e-4)
            self._rate_sample(self.uplink, bits, up_s, end, self.prior.uplink_bps)
        if down_bytes > 0 and end > first_byte:
            self._rate_sample(self.downlink, down_bytes * 8, end - first_byte, end, self.prior.downlink_bps)

    @staticmethod
    def _rate_sample(ewma: LogEwma, bits: float, seconds: float, now: float, prior: float) -> None:
        """A rate sample weighted by the longer of its measured and its predicted duration.

        A short transfer is mostly timing noise, unless it was predicted to be long: then it is
        strong evidence that the link got faster (and a probe sized for a link believed slow
        brings the estimate back up at once).
        """
        predicted = bits / ewma.value(prior)
        ewma.update(_clamp_rate(bits / seconds), max(seconds, predicted), now)

    # -- results --------------------------------------------------------------------------

    def estimates(self, now: float | None = None) -> Estimates:
        """The current estimates (the prior's values where nothing was observed yet).

        The uplink is the rate that predicts the expected transfer time (below), capped by the
        requests still uploading at ``now`` (see :meth:`start_transfer`).
        """
        p = self.prior
        t = self._now(now)
        uplink = self._effective(self.uplink, p.uplink_bps)
        if self._in_flight:
            wait = self.rtt.value(p.rtt_s) + self.queue.value(p.cloud_queue_s)
            for bits, start in self._in_flight.values():
                elapsed = t - start - wait
                if elapsed > 0 and bits / elapsed < uplink:
                    uplink = max(_MIN_RATE, bits / elapsed)
        return replace(
            p,
            uplink_bps=uplink,
            downlink_bps=self.downlink.value(p.downlink_bps),
            rtt_s=self.rtt.value(p.rtt_s),
            cloud_queue_s=self.queue.value(p.cloud_queue_s),
            device_slowdown=self.device.value(p.device_slowdown),
            cloud_slowdown=self.cloud.value(p.cloud_slowdown),
            uplink_sd=self._uplink_sd(t),
            head_slowdown=self.head_slowdowns() or p.head_slowdown,
        )

    def _uplink_sd(self, now: float) -> float:
        """The uplink's log-sd: its spread (as in :meth:`_effective`) grown with the estimate's
        age; before any sample, the prior's."""
        ewma = self.uplink
        if ewma.mean is None:
            return self.prior.uplink_sd
        return math.sqrt((1.25 * ewma.dev) ** 2 + ewma.drift * ewma.age(now))

    def _effective(self, ewma: LogEwma, default: float) -> float:
        """``exp(mean - risk * sd^2)``: with ``risk=0.5``, the rate whose reciprocal is the
        expected reciprocal if the log-rate is normal (so bytes / rate is the expected time)."""
        if ewma.mean is None:
            return default
        sd = 1.25 * ewma.dev  # mean absolute deviation to standard deviation
        return math.exp(ewma.mean - self.risk * sd * sd)

    def uncertainty(self, now: float | None = None) -> dict[str, float]:
        """Standard deviation of the log of each rate and speed (``inf`` before any sample)."""
        t = self._now(now)
        return {
            "uplink": self.uplink.sd(t),
            "downlink": self.downlink.sd(t),
            "device": self.device.sd(t),
            "cloud": self.cloud.sd(t),
        }

    def needs_probe(self, now: float | None = None) -> bool:
        """Whether the uplink estimate is older than ``probe_after_s`` (or was never measured)."""
        return self.uplink.age(self._now(now)) > self.probe_after_s

    def needs_rtt_probe(self, now: float | None = None) -> bool:
        """Whether the round trip's newest sample is older than ``rtt_probe_after_s`` (or none)."""
        last = self.rtt.last
        return last is None or self._now(now) - last > self.rtt_probe_after_s

    def probe_bytes(self) -> int:
        """A probe size that takes about 0.2 s at the estimated uplink: 4 KiB to 256 KiB."""
        rate = self.uplink.value(self.prior.uplink_bps)
        return int(min(256 * 1024, max(4 * 1024, rate * 0.2 / 8)))

    def summary(self) -> dict[str, Any]:
        """Sample counts, for logs and metrics."""
        return {
            "uplink_samples": self.uplink.count,
            "downlink_samples": self.downlink.count,
            "rtt_samples": len(self.rtt.samples),
            "queue_samples": len(self.queue.samples),
            "device_samples": self.device.count,
            "cuts_observed": len(self.cut_heads),
            "cloud_samples": self.cloud.count,
        }


def _clamp_rate(bps: float) -> float:
    return min(_MAX_RATE, max(_MIN_RATE, bps))
