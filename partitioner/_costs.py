"""The cost model: every (cut, codec) candidate of a bundle as rows of numpy arrays.

Contract: :class:`CostModel` needs only a bundle's ``cuts``, ``codecs``, ``fidelity`` and
``profiles`` (no segment is loaded or run). For each candidate it holds the profiled times
(seconds on the profiled machine) and the bytes sent, so that under :class:`Estimates` ``e``::

    latency(k, c) = head(k) * e.head_slowdown[k] + encode(k, c) * e.device_slowdown
                  + (decode(k, c) + tail(k)) * e.cloud_slowdown
                  + 8 * bytes(k, c) / e.uplink_bps
                  + sent * (e.rtt_s + e.cloud_queue_s + 8 * response_bytes / e.downlink_bps)

where ``sent`` is 0 for the last cut (everything on the device, nothing sent) and 1 elsewhere,
and ``e.head_slowdown[k]`` is ``e.device_slowdown`` where the estimates have no per-cut
correction (``Estimator.head_slowdowns``; an ``Estimates`` whose ``head_slowdown`` does not
have one factor per cut of this bundle, from another bundle, is priced with the scalar).
With the scalar alone that is a dot product of a fixed row of :data:`FEATURES` with a weight
vector built from the estimates, which is what makes a decision over a thousand candidates take
microseconds (a per-cut correction adds one vector to it).

Where numbers come from:

- head and tail: the profile's per-segment medians at batch 1 (the tail at ``cloud_batch``,
  the batch size the cloud runs, when the profile has it: a request waits for its whole batch),
  the head's on ``head_runtime`` (default: the runtime the bundle runs on in this process), the
  tail's on ``tail_runtime`` (default torch), torch's where the profile has none for a runtime;
- encode and decode: the profile's codec table; a (cut, codec) it lacks is interpolated from
  the same codec's cost per float32 byte at the other cuts (0 if the codec was never profiled);
- bytes: the fidelity table, else the profile's codec table, else, for a lossless codec, the
  float32 frontier size (an upper bound); a lossy candidate with no bytes anywhere is
  infeasible;
- fidelity: lossless codecs (``f32``, ``f32+zstd<N>``) are 1.0 by definition; a lossy
  candidate missing from the fidelity table has *unknown* fidelity, and is feasible only when
  the budget is 0 (unknown counts as 0). The last cut is exact and always feasible. A lossy
  row is admitted only where its interval supports the budget (:meth:`CostModel.exclusions`,
  ``_intervals.py``): its lower bound at ``confidence`` meets an agreement budget, or the upper
  bound of its accuracy drop meets an ``accuracy_drop`` budget;
- a codec this process cannot run (``+ans`` without the ``entropy`` extra) is infeasible.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitinfer._checks import check_number
from splitinfer.errors import ConfigError
from splitinfer.manifest import Manifest
from splitinfer.partitioner._estimate import Estimates
from splitinfer.partitioner._intervals import DEFAULT_CONFIDENCE, drop_interval, row_bounds
from splitinfer.partitioner._profiles import exit_times, pick_profile, runtime_of, segment_medians

__all__ = [
    "FEATURES",
    "STAGES",
    "CostModel",
    "EnergyModel",
    "energy_weights",
    "exit_mix",
    "is_lossless",
    "latency_weights",
]

#: Stages of a prediction, in the order a request goes through them (seconds each).
STAGES = ("head", "encode", "rtt", "uplink", "queue", "decode", "tail", "downlink")
#: Columns of :attr:`CostModel.features`: what each candidate multiplies with the estimates.
FEATURES = ("device_s", "cloud_s", "up_bits", "sent", "down_bits")


def is_lossless(spec: str) -> bool:
    """``f32`` with or without an entropy stage: exact, fidelity 1.0 by definition."""
    return spec.split("+", 1)[0] == "f32"


@dataclass(frozen=True)
class EnergyModel:
    """Device energy of one request, in joules (docs/decision.md)::

        energy = compute_w * (head + encode) + tx_w * uplink + rx_w * downlink
               + idle_w * (rtt + queue + decode + tail)

    Defaults are a phone-class device on a cellular link: a busy big core cluster of about
    2 W, a transmitting radio about 1.5 W, a receiving one 1 W and an idle-but-connected
    device waiting for the answer 0.3 W (the order of the LTE power model in Huang et al.,
    MobiSys 2012). Measure your device and pass its own numbers.
    """

    compute_w: float = 2.0
    tx_w: float = 1.5
    rx_w: float = 1.0
    idle_w: float = 0.3

    def __post_init__(self) -> None:
        for name in ("compute_w", "tx_w", "rx_w", "idle_w"):
            check_number(f"EnergyModel.{name}", getattr(self, name), lo=0.0, unit="watts")


def unrunnable(spec: str) -> str | None:
    """Why this process cannot encode with ``spec`` (the install line of its missing optional
    package), or None when it can."""
    from splitinfer.compression import get_codec
    from splitinfer.errors import CodecError

    try:
        get_codec(spec)
    except CodecError as exc:
        return str(exc)
    return None


def _runnable(spec: str) -> bool:
    return unrunnable(spec) is None


#: Codec sets already reported as unrunnable in this process (said once, not per policy).
_REPORTED: set[tuple[str, ...]] = set()


def _report_unrunnable(codecs: tuple[str, ...], runnable: dict[str, bool]) -> None:
    missing = tuple(spec for spec in codecs if not runnable[spec])
    if missing and missing not in _REPORTED:
        _REPORTED.add(missing)
        logging.getLogger("splitinfer.partitioner").warning(
            "codecs %s are never chosen here: %s", ", ".join(missing), unrunnable(missing[0])
        )


class CostModel:
    """Every candidate of ``bundle`` with its profiled costs (see the module docstring).

    Rows ``0..N-2`` are the cuts ``0..n-1`` crossed with ``bundle.codecs`` (in that order);
    the final row is the last cut, whose codec is nominal (``bundle.codecs[0]``): nothing is
    sent. Arrays are read-only.
    """

    def __init__(
        self,
        bundle: Manifest,
        *,
        profile: str | None = None,
        cloud_batch: int = 1,
        head_runtime: str | None = None,
        tail_runtime: str = "torch",
    ):
        if not bundle.codecs:
            raise ConfigError(f"bundle {bundle.name!r} offers no codecs")
        if not isinstance(cloud_batch, int) or cloud_batch < 1:
            raise ConfigError(f"cloud_batch must be an int >= 1, got {cloud_batch!r}")
        self.bundle_name = bundle.name
        self.n = bundle.last_cut
        self.codecs = tuple(bundle.codecs)
        self.cut_names = tuple(c.name for c in bundle.cuts)
        picked = pick_profile(bundle, profile)
        self.profile_name = None if picked is None else picked[0]
        prof: Mapping[str, Any] = {} if picked is None else picked[1]
        self.profiled = picked is not None
        # heads priced on the runtime this bundle runs on here (the edge's), tails on the cloud's
        self.runtimes = (head_runtime or runtime_of(bundle), tail_runtime)
        seg1 = None if picked is None else segment_medians(bundle, picked[0], prof, 1, self.runtimes[0])
        if picked is not None and seg1 is None:
            raise ConfigError(f"profile {picked[0]!r} of bundle {bundle.name!r} has no batch-1 segment times")
        segb = None if picked is None else segment_medians(bundle, picked[0], prof, cloud_batch, tail_runtime)
        if segb is None:
            segb = None if picked is None else segment_medians(bundle, picked[0], prof, 1, tail_runtime)
        n = self.n
        head_k = np.concatenate([[0.0], np.cumsum(seg1)]) if seg1 is not None else np.full(n + 1, np.nan)
        cum_b = np.concatenate([[0.0], np.cumsum(segb)]) if segb is not None else np.full(n + 1, np.nan)
        tail_k = cum_b[-1] - cum_b
        self.response_bytes = float(prof.get("response_bytes", 0.0)) if self.profiled else 0.0

        fid_rows = {(int(r["cut"]), str(r["codec"])): r for r in (bundle.fidelity or {}).get("table", [])}
        self.fidelity_metric = str((bundle.fidelity or {}).get("metric", "top1"))
        samples = (bundle.fidelity or {}).get("samples")
        #: The table's sample size, for rows that lack their own ``n`` (tables before issue 28).
        self.fidelity_samples = samples if isinstance(samples, int) and samples > 0 else None
        #: Whether the table has labelled rows (accuracy and its drop; issue 28).
        self.labelled = bool((bundle.fidelity or {}).get("labels"))
        self._rows: list[dict[str, Any] | None] = []
        codec_rows = {(int(r["cut"]), str(r["codec"])): r for r in prof.get("codecs", [])}
        nbytes = np.array([c.nbytes for c in bundle.cuts], dtype=np.float64)
        per_byte = _codec_cost_per_byte(codec_rows, nbytes)

        # a codec this process cannot run (+ans without the entropy extra) is never a candidate:
        # the edge would fail on the encode instead of sending something it can
        runnable = {spec: _runnable(spec) for spec in self.codecs}
        _report_unrunnable(self.codecs, runnable)
        cuts, codec_idx, fidelity, sizes, enc, dec = [], [], [], [], [], []
        for k in range(n):
            for j, spec in enumerate(self.codecs):
                cuts.append(k)
                codec_idx.append(j)
                frow, crow = fid_rows.get((k, spec)), codec_rows.get((k, spec))
                self._rows.append(frow)
                if not runnable[spec]:
                    fidelity.append(math.nan)
                elif is_lossless(spec):
                    fidelity.append(1.0)
                else:
                    fidelity.append(float(frow["fidelity"]) if frow is not None else math.nan)
                if not runnable[spec]:
                    sizes.append(math.nan)  # no bytes: infeasible at every budget
                elif frow is not None and frow.get("bytes") is not None:
                    sizes.append(float(frow["bytes"]))
                elif crow is not None and crow.get("bytes") is not None:
                    sizes.append(float(crow["bytes"]))
                elif is_lossless(spec):
                    sizes.append(float(nbytes[k]))
                else:
                    sizes.append(math.nan)
                if crow is not None:
                    enc.append(float(crow["encode_s"]))
                    dec.append(float(crow["decode_s"]))
                elif self.profiled:
                    e, d = per_byte.get(spec, (0.0, 0.0))
                    enc.append(e * nbytes[k])
                    dec.append(d * nbytes[k])
                else:
                    enc.append(math.nan)
                    dec.append(math.nan)
        cuts.append(n)
        codec_idx.append(0)
        self._rows.append(None)
        fidelity.append(1.0)
        sizes.append(0.0)
        enc.append(0.0)
        dec.append(0.0)
        self.cut = _frozen(np.array(cuts, dtype=np.int64))
        self.codec_index = _frozen(np.array(codec_idx, dtype=np.int64))
        self.fidelity = _frozen(np.array(fidelity))
        self.bytes = _frozen(np.array(sizes))
        self.encode = _frozen(np.array(enc))
        self.decode = _frozen(np.array(dec))
        sent = self.cut < n
        self.sent = _frozen(sent.astype(np.float64))
        #: Per cut ``0..n``, the profiled head (seconds).
        self.head_by_cut = _frozen(head_k)
        self.head = _frozen(head_k[self.cut])
        self.tail = _frozen(np.where(sent, tail_k[self.cut], 0.0))
        self.cloud_batch = cloud_batch
        #: Per row, the early exit the edge tries on the way (the deepest offered at or before
        #: its cut; -1 for none), the share of requests it answers (measured on held-out
        #: inputs), the head's time to it and the exit head's own time (the profile's, 0 where
        #: it has none): the expected cost mixes answering there with going on, and both pay
        #: the exit head (:func:`exit_mix`; docs/learning.md). All zero without exits.
        self.exit_cut, self.exit_rate, self.exit_head, self.exit_time = exit_mix(
            bundle, self.cut, head_k, {} if picked is None else exit_times(bundle, picked[0], prof)
        )
        #: One row per candidate, columns :data:`FEATURES` (NaN bytes count as 0 here: such a
        #: candidate is never feasible, see :meth:`feasible`).
        self.features = self._features()

    def _features(self) -> np.ndarray:
        features = np.column_stack(
            [
                self.head + self.encode,
                self.decode + self.tail,
                np.nan_to_num(self.bytes) * 8.0,
                self.sent,
                self.sent * self.response_bytes * 8.0,
            ]
        )
        return _frozen(self._mixed(features, 0))

    def _mixed(self, columns: np.ndarray, device: int) -> np.ndarray:
        """``columns`` (one row per candidate, linear in the estimates) priced with the rows'
        early exits: ``rate * (head to the exit)`` in column ``device`` plus ``(1 - rate)`` of
        going on, plus the exit head's own time (run whether it answers or not). Unchanged
        where a row has no exit."""
        rate = getattr(self, "exit_rate", None)
        if rate is None or not (rate.any() or self.exit_time.any()):
            return columns
        mixed = columns * (1.0 - rate)[:, None]
        mixed[:, device] += self._exit_device()
        return mixed

    def _exit_device(self) -> np.ndarray:
        """Per row, the device seconds (profiled) its exit adds to the mix beside ``(1 - rate)``
        of going on: ``rate * head(exit) + exit head`` (0 where the row has no exit)."""
        return self.exit_rate * self.exit_head + self.exit_time

    def for_tasks(self, others: Sequence[Manifest], shared_cut: int) -> CostModel:
        """A new cost model, over this one's rows, pricing one upload answered by this model
        and every one of ``others`` (models that compute this one's head up to ``shared_cut``).

        A sent row at a cut up to ``shared_cut`` costs, on the cloud, this model's tail plus
        every other model's own tail from ``shared_cut``, and every model's answer; its
        fidelity with a lossy codec is the least of every model's (NaN where one lacks it).
        The all-on-device row costs this model's head plus every other model's segments from
        ``shared_cut``. Rows at deeper cuts keep this model's prices (the caller does not
        allow them: the heads differ there). The others are priced like this model (same
        profile, cloud batch and runtimes); ConfigError if one has no profile and this does.
        """
        priced = [self._like(m) for m in others]
        shared = (self.cut <= shared_cut) & (self.sent > 0)
        extra_tail = sum(m._tail_at(shared_cut) for m in priced)
        extra_local = sum(m._head_at(m.n) - m._head_at(shared_cut) for m in priced)
        head = self.head.copy()
        head[self.local] += extra_local
        fidelity = self.fidelity.copy()
        for i in np.flatnonzero(shared):
            k, spec = int(self.cut[i]), self.codec(int(i))
            if not is_lossless(spec):
                fidelity[i] = min([float(self.fidelity[i]), *(m._fidelity_at(k, spec) for m in priced)])
        model = copy.copy(self)
        model.tail = _frozen(np.where(shared, self.tail + extra_tail, self.tail))
        model.head, model.fidelity = _frozen(head), _frozen(fidelity)
        by_cut = self.head_by_cut.copy()
        by_cut[self.n] += extra_local  # the all-on-device "head" runs every model (as head[local])
        model.head_by_cut = _frozen(by_cut)
        model.response_bytes = self.response_bytes + sum(m.response_bytes for m in priced)
        none = _frozen(np.zeros(len(self)))  # an exit answers for one model, not for tasks
        model.exit_cut, model.exit_rate = _frozen(np.full(len(self), -1)), none
        model.exit_head, model.exit_time = none, none
        model.features = model._features()
        return model

    def _like(self, other: Manifest) -> CostModel:
        """``other``'s cost model, priced like this one."""
        profile = self.profile_name if self.profile_name in other.profiles else None
        model = CostModel(
            other,
            profile=profile,
            cloud_batch=self.cloud_batch,
            head_runtime=self.runtimes[0],
            tail_runtime=self.runtimes[1],
        )
        if self.profiled and not model.profiled:
            raise ConfigError(
                f"task {other.name!r} has no profile, so its tail cannot be priced: profile it "
                "(`splitinfer profile BUNDLE`) like the client's bundle"
            )
        return model

    def _head_at(self, k: int) -> float:
        return float(self.head[int(np.flatnonzero(self.cut == k)[0])])

    def _tail_at(self, k: int) -> float:
        rows = np.flatnonzero((self.cut == k) & (self.sent > 0))
        return float(self.tail[int(rows[0])]) if rows.size else 0.0

    def _fidelity_at(self, k: int, spec: str) -> float:
        if spec not in self.codecs:
            return math.nan
        rows = np.flatnonzero((self.cut == k) & (self.codec_index == self.codecs.index(spec)))
        return float(self.fidelity[int(rows[0])]) if rows.size else math.nan

    def __len__(self) -> int:
        return len(self.cut)

    @property
    def local(self) -> int:
        """Row of the last cut (all on the device)."""
        return len(self.cut) - 1

    def codec(self, row: int) -> str:
        return self.codecs[int(self.codec_index[row])]

    def exclusions(
        self,
        budget: float,
        privacy_floor: int | None,
        *,
        confidence: float = DEFAULT_CONFIDENCE,
        accuracy_drop: float | None = None,
    ) -> list[str]:
        """Per row, why it is infeasible under ``budget`` and ``privacy_floor`` ('' if feasible).

        A lossy row is admitted where its agreement's lower bound at ``confidence`` (one-sided,
        ``_intervals.py``) meets ``budget``; with ``accuracy_drop`` given instead, where the upper
        bound of its accuracy drop is at most ``accuracy_drop`` (``budget`` is then ignored, and
        the table must be labelled). A row without its own ``n`` uses the table's ``samples``;
        a table with neither (before issue 22) is judged on the interval it stores, else on its
        point estimate. Lossless rows and the last cut are exact. Each reason is a category,
        then details in parentheses.
        """
        if accuracy_drop is not None and not self.labelled:
            raise ConfigError(
                f"an accuracy-drop budget needs a fidelity table measured with labels, and bundle "
                f"{self.bundle_name!r} has none: compile with labels (labels=[...] beside evaluation=, "
                "or --evaluation DIR of images named by their class), or give an agreement budget"
            )
        reasons = []
        for i in range(len(self.cut)):
            k = int(self.cut[i])
            if k == self.n:
                reasons.append("")
            elif privacy_floor is not None and k < privacy_floor:
                reasons.append(f"below the privacy floor (cut {privacy_floor})")
            elif math.isnan(self.bytes[i]):
                reasons.append("not measured at this cut (in neither the fidelity table nor the profile)")
            elif math.isnan(self.fidelity[i]) and (budget > 0 or accuracy_drop is not None):
                reasons.append("fidelity unknown (not in the fidelity table)")
            elif accuracy_drop is not None:
                reasons.append(self._drop_reason(i, accuracy_drop, confidence))
            else:
                reasons.append(self._agreement_reason(i, budget, confidence))
        return reasons

    def _agreement_reason(self, i: int, budget: float, confidence: float) -> str:
        row = self._rows[i]
        if row is None or is_lossless(self.codec(i)) or math.isnan(self.fidelity[i]):
            return ""  # exact, or unknown under a budget of 0
        bounds = row_bounds(row, self.fidelity_metric, confidence, self.fidelity_samples)
        if bounds is None:  # a table without sample sizes or intervals: its point estimate
            if self.fidelity[i] < budget:
                return f"fidelity below the budget ({self.fidelity[i]:.4f} < {budget})"
            return ""
        if bounds[0] < budget:
            n = row.get("n", self.fidelity_samples)
            on = f"{n} inputs" if n else "an unknown number of inputs"
            return (
                f"fidelity's lower bound below the budget ({self.fidelity[i]:.4f}, lower bound "
                f"{bounds[0]:.4f} at {confidence:g} on {on} < {budget})"
            )
        return ""

    def _drop_reason(self, i: int, accuracy_drop: float, confidence: float) -> str:
        row = self._rows[i]
        if row is None or is_lossless(self.codec(i)):
            return ""
        lost, gained, n = row.get("lost"), row.get("gained"), row.get("n")
        if not all(isinstance(v, int) for v in (lost, gained, n)):
            return "accuracy drop unknown (the row has no labelled measurement)"
        high = drop_interval(int(lost), int(gained), int(n), confidence)[1]  # type: ignore[arg-type]
        if high > accuracy_drop:
            return (
                f"accuracy drop's upper bound above the budget ({(lost - gained) / n:+.4f}, upper bound "  # type: ignore[operator]
                f"{high:.4f} at {confidence:g} on {n} inputs > {accuracy_drop})"
            )
        return ""

    def feasible(
        self,
        budget: float,
        privacy_floor: int | None,
        *,
        confidence: float = DEFAULT_CONFIDENCE,
        accuracy_drop: float | None = None,
    ) -> np.ndarray:
        """Boolean mask of the rows feasible under ``budget`` and ``privacy_floor``."""
        reasons = self.exclusions(budget, privacy_floor, confidence=confidence, accuracy_drop=accuracy_drop)
        return np.array([not r for r in reasons])

    def head_factors(self, est: Estimates) -> np.ndarray | None:
        """Per cut ``0..n``, the slowdown the head of that cut is priced at under ``est``; None
        where ``est`` has no per-cut correction for this bundle (``device_slowdown`` for all)."""
        if len(est.head_slowdown) != self.n + 1:
            return None
        return np.asarray(est.head_slowdown, dtype=np.float64)

    def device_heads(self, est: Estimates) -> np.ndarray:
        """Per cut ``0..n``, the predicted seconds of its head on the device under ``est``."""
        factors = self.head_factors(est)
        return self.head_by_cut * (est.device_slowdown if factors is None else factors)

    def stages(self, row: int, est: Estimates) -> dict[str, float]:
        """Predicted seconds per stage (:data:`STAGES`) of candidate ``row`` under ``est``."""
        head = float(self.device_heads(est)[self.cut[row]])
        if not self.sent[row]:
            return {"head": head}
        return {
            "head": head,
            "encode": float(self.encode[row]) * est.device_slowdown,
            "rtt": est.rtt_s,
            "uplink": float(self.bytes[row]) * 8.0 / est.uplink_bps,
            "queue": est.cloud_queue_s,
            "decode": float(self.decode[row]) * est.cloud_slowdown,
            "tail": float(self.tail[row]) * est.cloud_slowdown,
            "downlink": self.response_bytes * 8.0 / est.downlink_bps,
        }

    def stage_matrix(self, est: Estimates) -> np.ndarray:
        """Predicted seconds of every row (rows) and stage (columns, :data:`STAGES`); with early
        exits, expected seconds (an exited request spends only the head to its exit)."""
        sent = self.sent
        matrix = np.column_stack(
            [
                self.device_heads(est)[self.cut],
                self.encode * est.device_slowdown,
                sent * est.rtt_s,
                np.nan_to_num(self.bytes) * 8.0 / est.uplink_bps,
                sent * est.cloud_queue_s,
                self.decode * est.cloud_slowdown,
                self.tail * est.cloud_slowdown,
                sent * self.response_bytes * 8.0 / est.downlink_bps,
            ]
        )
        if self.exit_rate.any() or self.exit_time.any():
            matrix = self._mixed(matrix, 0)
            matrix[:, 0] += self._exit_device() * (est.device_slowdown - 1.0)
        return matrix


def exit_mix(
    bundle: Manifest, cuts: np.ndarray, head_k: np.ndarray, times: Mapping[int, float] | None = None
) -> tuple[np.ndarray, ...]:
    """Per row (at ``cuts``): the cut of the deepest offered early exit at or before it (-1:
    none), its exit rate, the profiled head time to it and the exit head's own time (``times``
    by cut, a profile's :func:`~._profiles.exit_times`; 0 where none or unprofiled)."""
    offered = sorted(
        (int(e["cut"]), float(e.get("exit_rate") or 0.0))
        for e in getattr(bundle, "exits", None) or []
        if e.get("threshold") is not None and e.get("file")
    )
    exit_cut = np.full(len(cuts), -1, dtype=np.int64)
    rate = np.zeros(len(cuts))
    head = np.zeros(len(cuts))
    own = np.zeros(len(cuts))
    for e, r in offered:
        at = cuts >= e
        exit_cut[at] = e
        rate[at] = r
        head[at] = head_k[e] if math.isfinite(head_k[e]) else 0.0
        own[at] = float((times or {}).get(e, 0.0))
    return _frozen(exit_cut), _frozen(rate), _frozen(head), _frozen(own)


def latency_weights(est: Estimates) -> np.ndarray:
    """The weights that turn :data:`FEATURES` into predicted latency (seconds)."""
    return np.array(
        [
            est.device_slowdown,
            est.cloud_slowdown,
            1.0 / est.uplink_bps,
            est.rtt_s + est.cloud_queue_s,
            1.0 / est.downlink_bps,
        ]
    )


def energy_weights(est: Estimates, energy: EnergyModel) -> np.ndarray:
    """The weights that turn :data:`FEATURES` into predicted device energy (joules)."""
    return np.array(
        [
            energy.compute_w * est.device_slowdown,
            energy.idle_w * est.cloud_slowdown,
            energy.tx_w / est.uplink_bps,
            energy.idle_w * (est.rtt_s + est.cloud_queue_s),
            energy.rx_w / est.downlink_bps,
        ]
    )


def _codec_cost_per_byte(
    rows: Mapping[tuple[int, str], Mapping[str, Any]], nbytes: np.ndarray
) -> dict[str, tuple[float, float]]:
    """Median encode and decode seconds per float32 frontier byte of each profiled codec."""
    ratios: dict[str, list[tuple[float, float]]] = {}
    for (k, spec), row in rows.items():
        if 0 <= k < len(nbytes) and nbytes[k] > 0:
            ratios.setdefault(spec, []).append(
                (float(row["encode_s"]) / nbytes[k], float(row["decode_s"]) / nbytes[k])
            )
    return {
        spec: (float(np.median([r[0] for r in rs])), float(np.median([r[1] for r in rs])))
        for spec, rs in ratios.items()
    }


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a
