"""Policies: the per-request choice of a cut and a codec, behind one interface.

Every policy is a :class:`Policy`: ``decide(est)`` returns a :class:`Decision`, ``explain(est)``
an :class:`Explanation` listing every candidate with its predicted stages and why the winner
won. All of them rank the same candidates with the same cost model (``_costs.py``); they
differ in which candidates they allow and what they minimize:

============== ==========================================================================
``adaptive``   every (cut, codec) whose fidelity meets the budget (below), at or above the privacy
               floor, plus the last cut; minimizes predicted latency plus
               ``energy_weight`` times predicted device energy; explores (below)
``static``     one (cut, codec), always
``local``      the last cut: everything on the device
``cloud``      cut 0: the input, with the codec of lowest predicted latency among those
               meeting the budget
``neurosurgeon`` every cut with ``f32`` (no compression), plus the last cut; minimizes
               predicted latency (Kang et al., ASPLOS 2017: the classic baseline)
============== ==========================================================================

The budget (``adaptive`` and ``cloud``) is an agreement, ``fidelity_budget`` (default 0.99), or
an accuracy drop, ``accuracy_drop`` (for example 0.01: one point of top-1 accuracy; needs a
labelled table; where given, the agreement budget is not applied); a lossy row is admitted only
where its interval supports it at ``confidence`` (one-sided, default 0.9): the lower bound of
its agreement is at least ``fidelity_budget``, or the upper bound of its accuracy drop at most
``accuracy_drop`` (``_costs.CostModel.exclusions``, ``_intervals.py``; docs/fidelity.md).

Exploration (``adaptive`` only): with probability ``explore`` a decision takes, instead of the
winner, a uniformly drawn other feasible candidate whose predicted objective is within
``explore_margin`` of the winner's. The cost of exploring is bounded by construction (at most
``explore * explore_margin`` of the mean predicted objective, 0.5% by default), and it keeps
the estimators fed from more than one operating point: transfers of other sizes, head times
at other cuts. It never leaves the feasible set, so budget and privacy floor hold for every
decision. ``explore=0`` makes ``decide`` the exact argmin of the cost model.

Speed: the feasible rows' feature matrix is built once per policy, so ``decide`` is one
matrix-vector product and an argmin (``benchmarks/results/policy.md``: about 5 microseconds
for a thousand candidates).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from splitinfer._checks import check_number
from splitinfer.errors import ConfigError
from splitinfer.manifest import Manifest
from splitinfer.partitioner._costs import (
    STAGES,
    CostModel,
    EnergyModel,
    energy_weights,
    latency_weights,
    unrunnable,
)
from splitinfer.partitioner._estimate import Estimates
from splitinfer.partitioner._hedge import expected_hedged, max_saving
from splitinfer.partitioner._intervals import DEFAULT_CONFIDENCE

#: Objectives of the adaptive policy -> the uplink quantile's z-score they price (0: expected).
OBJECTIVES = {"mean": 0.0, "p95": 1.6448536269514722}

log = logging.getLogger("splitinfer.partitioner")

__all__ = [
    "OBJECTIVES",
    "POLICIES",
    "Candidate",
    "Decision",
    "Explanation",
    "Policy",
    "TablePolicy",
    "make_policy",
]


@dataclass(frozen=True)
class Decision:
    """Where to cut and how to encode one request, and what the policy predicts it costs.

    At the last cut (``cut == bundle.last_cut``) nothing is sent and ``codec`` is nominal (the
    bundle's first codec). ``stages`` maps :data:`~splitinfer.partitioner._costs.STAGES` to
    predicted seconds (only ``head`` at the last cut); ``predicted_s`` is their sum (NaN when
    the bundle has no profile). ``explored`` is True when the policy deliberately took a
    near-optimal candidate other than the winner. ``finish_s`` is the predicted seconds the
    device would take to finish the request alone from the frontier at ``cut`` (its tail: 0 at
    the last cut): what a hedged request costs once it gives up on the cloud
    (:func:`splitinfer.partitioner.hedge_after`).
    """

    cut: int
    codec: str
    predicted_s: float
    stages: dict[str, float] = field(default_factory=dict, hash=False)
    energy_j: float = math.nan
    explored: bool = False
    finish_s: float = math.nan
    #: The early exit the edge tries on the way (docs/learning.md): its cut (None: none) and
    #: the share of requests it answers. ``stages`` and ``predicted_s`` are the path that goes
    #: on; the policy chose on the expected cost that mixes the two.
    exit_cut: int | None = None
    exit_rate: float = 0.0


@dataclass(frozen=True)
class Candidate:
    """One (cut, codec) pair as a policy sees it under some estimates."""

    cut: int
    cut_name: str
    codec: str
    predicted_s: float
    #: What the policy minimizes: latency, plus energy_weight times energy.
    objective: float
    energy_j: float
    stages: dict[str, float] = field(hash=False)
    #: Agreement with the uncompressed model; None when unknown.
    fidelity: float | None
    #: Bytes sent at batch 1; None when unknown.
    bytes: float | None
    #: Empty when the policy may choose it, else why not.
    excluded: str = ""

    @property
    def feasible(self) -> bool:
        return not self.excluded


@dataclass(frozen=True)
class Explanation:
    """Every candidate (allowed ones first, best first) and why the winner won."""

    policy: str
    estimates: Estimates
    decision: Decision
    candidates: tuple[Candidate, ...]
    reason: str

    def format(self, top: int | None = 10) -> str:
        """A text table of the ``top`` allowed candidates (all with None), then the reason."""
        allowed = [c for c in self.candidates if c.feasible]
        shown = allowed if top is None else allowed[:top]
        e = self.estimates
        lines = [
            f"policy {self.policy}: uplink {_rate(e.uplink_bps)}, downlink {_rate(e.downlink_bps)}, "
            f"rtt {e.rtt_s * 1000:.0f} ms, queue {e.cloud_queue_s * 1000:.0f} ms, "
            f"device x{e.device_slowdown:g}, cloud x{e.cloud_slowdown:g}"
            + (", heads corrected per cut" if e.head_slowdown else ""),
            f"{'rank':>4}  {'cut':>4}  {'codec':<12} {'KiB':>8} {'fidelity':>8} {'total ms':>9}  "
            + "  ".join(f"{s:>8}" for s in STAGES),
        ]
        for rank, c in enumerate(shown, 1):
            kib = "-" if c.bytes is None else f"{c.bytes / 1024:.1f}"
            fid = "-" if c.fidelity is None else f"{c.fidelity:.4f}"
            codec = c.codec if c.stages.get("rtt") is not None else "(local)"
            lines.append(
                f"{rank:>4}  {c.cut:>4}  {codec:<12} {kib:>8} {fid:>8} {c.predicted_s * 1000:>9.1f}  "
                + "  ".join(f"{c.stages[s] * 1000:>8.1f}" if s in c.stages else f"{'-':>8}" for s in STAGES)
            )
        if top is not None and len(allowed) > top:
            lines.append(f"      ... {len(allowed) - top} more allowed candidates")
        lines.append(self.reason)
        d = self.decision
        if d.exit_cut is not None:
            lines.append(
                f"early exit at cut {d.exit_cut} on the way: it answers {100 * d.exit_rate:.1f}% of requests "
                "on the device (measured on held-out inputs); totals above are expected times that mix "
                "answering there with going on"
            )
        return "\n".join(lines)


@runtime_checkable
class Policy(Protocol):
    """Chooses a cut and codec per request from the current estimates."""

    name: str

    def decide(self, est: Estimates) -> Decision:
        """The choice for one request. Must be fast: it runs on every request."""
        ...

    def explain(self, est: Estimates) -> Explanation:
        """Every candidate with its predicted cost and why the winner won (slow is fine)."""
        ...


class TablePolicy:
    """A policy over a subset (``allowed``, a boolean mask) of a :class:`CostModel`'s rows.

    Minimizes ``latency + energy_weight * energy`` over the allowed rows; see the module
    docstring for ``explore``. ``objective="p95"`` prices the upload at the uplink's 5 %
    quantile (``uplink_bps * exp(-1.645 * uplink_sd)``) instead of its expected rate: the
    request's latency that 95 % of requests stay under, for apps that care about the tail.
    ``hedged=True`` (mean objective only) prices each sent candidate at its expected time with
    the hedge, ``E[min(cloud, hedge_after + finish)]`` under the uplink's current log-sd
    (:func:`splitinfer.partitioner._hedge.expected_hedged`). ``excluded`` gives, per row, why it
    is not allowed (shown by :meth:`explain`). Build one with :func:`make_policy`.
    """

    def __init__(
        self,
        name: str,
        model: CostModel,
        allowed: np.ndarray,
        excluded: list[str],
        *,
        energy_weight: float = 0.0,
        energy: EnergyModel | None = None,
        explore: float = 0.0,
        explore_margin: float = 0.1,
        seed: int | None = None,
        settings: str = "",
        objective: str = "mean",
        hedged: bool = False,
    ):
        if objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        check_number("energy_weight", energy_weight, lo=0.0)
        check_number("explore", explore, lo=0.0, hi=1.0, hi_open=True)
        check_number("explore_margin", explore_margin, lo=0.0)
        if energy is not None and not isinstance(energy, EnergyModel):
            raise ConfigError(f"energy must be an EnergyModel, got {type(energy).__name__}")
        rows = np.flatnonzero(allowed)
        if rows.size == 0:
            raise ConfigError(f"policy {name}: no candidate is allowed ({settings})")
        self.name = name
        self.model = model
        self.energy_weight = float(energy_weight)
        self.energy = energy or EnergyModel()
        self.explore = float(explore)
        self.explore_margin = float(explore_margin)
        self.settings = settings
        self.objective = objective
        self._z = OBJECTIVES[objective]
        #: Price the hedge into the mean objective (the p95 objective prices the upload's quantile
        #: instead): a sent request costs ``E[min(cloud, hedge_after + finish)]``.
        self.hedged = bool(hedged) and not self._z
        self._excluded = excluded
        self._rows = rows
        # Per allowed row, as Python numbers: what a decision needs without numpy indexing.
        self._info = [
            (
                int(model.cut[i]),
                model.codec(i),
                bool(model.sent[i]),
                float(model.head[i]),
                float(model.encode[i]),
                float(model.decode[i]),
                float(model.tail[i]),
                float(np.nan_to_num(model.bytes[i])) * 8.0,
                float(model.head[model.local] - model.head[i]),
            )
            for i in rows.tolist()
        ]
        self._features_t = np.ascontiguousarray(model.features[rows].T)
        # per allowed row, its cut and profiled head: a per-cut head correction is added to the
        # dot product (which prices every head at device_slowdown) as one more vector
        self._row_cuts = model.cut[rows]
        self._row_heads = np.nan_to_num(model.head[rows])
        self._seed = seed
        self._rng = random.Random(seed)

    @property
    def rows(self) -> np.ndarray:
        """The indices of the allowed rows of :attr:`model` (read-only), in the model's order."""
        view = self._rows.view()
        view.flags.writeable = False
        return view

    @property
    def allowed(self) -> np.ndarray:
        """Per row of :attr:`model`, whether this policy may choose it (a new boolean array)."""
        mask = np.zeros(len(self.model), dtype=bool)
        mask[self._rows] = True
        return mask

    def restricted(
        self, model: CostModel, keep: np.ndarray, why: Sequence[str], settings: str
    ) -> TablePolicy:
        """This policy (its objective, energy, exploration and hedging) over ``model``, a cost
        model with the same rows as :attr:`model` priced otherwise (``CostModel.for_tasks``),
        allowing the rows it allows where ``keep`` holds; ``why[i]`` says why row ``i`` is not
        kept, ``settings`` is added to this policy's. ConfigError if no row is left."""
        if len(model) != len(self.model) or len(keep) != len(model) or len(why) != len(model):
            raise ConfigError(f"restricted needs {len(self.model)} rows, as this policy's model has")
        chosen = self.allowed
        excluded = [
            self._excluded[i]
            or ("" if chosen[i] else f"not a {self.name} candidate")
            or ("" if keep[i] else why[i])
            for i in range(len(model))
        ]
        return TablePolicy(
            self.name,
            model,
            chosen & np.asarray(keep, dtype=bool),
            excluded,
            energy_weight=self.energy_weight,
            energy=self.energy,
            explore=self.explore,
            explore_margin=self.explore_margin,
            seed=self._seed,
            settings=f"{self.settings}; {settings}",
            objective=self.objective,
            hedged=self.hedged,
        )

    def _weights(self, est: Estimates) -> np.ndarray:
        w = latency_weights(est)
        if self._z and est.uplink_sd:
            w[2] *= math.exp(self._z * est.uplink_sd)
        if self.energy_weight:
            w = w + self.energy_weight * energy_weights(est, self.energy)
        return w

    def decide(self, est: Estimates) -> Decision:
        """The allowed candidate of least predicted objective (or, rarely, a near-optimal one)."""
        if len(self._info) == 1:
            return self._decision(0, est, explored=False)
        w = self._weights(est)
        objective = w @ self._features_t
        factors = self.model.head_factors(est)
        if factors is not None:  # w[0] is the device's price per profiled second times its slowdown
            objective += (
                (w[0] / est.device_slowdown)
                * self._row_heads
                * (factors[self._row_cuts] - est.device_slowdown)
            )
        best = int(objective.argmin())
        if self.hedged:
            best = self._hedged_best(objective, best, est)
        if self.explore and self._rng.random() < self.explore:
            near = np.flatnonzero(objective <= objective[best] * (1.0 + self.explore_margin))
            near = near[near != best]
            if near.size:
                return self._decision(int(near[self._rng.randrange(near.size)]), est, explored=True)
        return self._decision(best, est, explored=False)

    def _hedged_best(self, objective: np.ndarray, best: int, est: Estimates) -> int:
        """The allowed row of least objective once each sent candidate's hedge is priced.

        The hedge only lowers a candidate's cost, by at most :func:`max_saving` of it, so only
        the rows within that share of the unhedged best can win: those few are priced exactly
        (usually one to five, which keeps ``decide`` within its budget)."""
        limit = float(objective[best]) / (1.0 - max_saving(est.uplink_sd))
        near = np.flatnonzero(objective <= limit)
        if near.size <= 1:
            return best
        sd, cs = est.uplink_sd, est.cloud_slowdown
        heads = self.model.device_heads(est)
        fixed = est.rtt_s + est.cloud_queue_s + self.model.response_bytes * 8.0 / est.downlink_bps
        winner, least = best, math.inf
        for i in near.tolist():
            cost = float(objective[i])
            cut, _, sent, _, _, decode, tail, bits, _ = self._info[i]
            if sent:
                up = bits / est.uplink_bps
                cloud = fixed + up + (decode + tail) * cs
                cost -= cloud - expected_hedged(cloud, up, float(heads[-1] - heads[cut]), sd)
            if cost < least:
                winner, least = i, cost
        return winner

    def _decision(self, i: int, est: Estimates, *, explored: bool) -> Decision:
        """The decision for allowed row number ``i`` (same numbers as CostModel.stages), with
        the early exit on its way, if any."""
        decision = self._plain_decision(i, est, explored=explored)
        row = int(self._rows[i])
        exit_cut = int(self.model.exit_cut[row])
        if exit_cut < 0:
            return decision
        return dataclasses.replace(decision, exit_cut=exit_cut, exit_rate=float(self.model.exit_rate[row]))

    def _plain_decision(self, i: int, est: Estimates, *, explored: bool) -> Decision:
        """The decision for allowed row number ``i`` (same numbers as CostModel.stages)."""
        cut, codec, sent, head, encode, decode, tail, bits, finish = self._info[i]
        e = self.energy
        factors = self.model.head_factors(est)
        if factors is None:
            head_s, finish_s = head * est.device_slowdown, finish * est.device_slowdown
        else:
            head_s = head * float(factors[cut])
            finish_s = (head + finish) * float(factors[-1]) - head_s
        device = head_s + encode * est.device_slowdown
        if not sent:
            return Decision(cut, codec, device, {"head": device}, e.compute_w * device, explored, 0.0)
        stages = {
            "head": head_s,
            "encode": encode * est.device_slowdown,
            "rtt": est.rtt_s,
            "uplink": bits / est.uplink_bps,
            "queue": est.cloud_queue_s,
            "decode": decode * est.cloud_slowdown,
            "tail": tail * est.cloud_slowdown,
            "downlink": self.model.response_bytes * 8.0 / est.downlink_bps,
        }
        energy = (
            e.compute_w * device
            + e.tx_w * stages["uplink"]
            + e.rx_w * stages["downlink"]
            + e.idle_w * (est.rtt_s + est.cloud_queue_s + stages["decode"] + stages["tail"])
        )
        return Decision(cut, codec, sum(stages.values()), stages, energy, explored, finish_s)

    def explain(self, est: Estimates) -> Explanation:
        """All candidates under ``est``: allowed ones by objective, then the others by latency."""
        model = self.model
        matrix = model.stage_matrix(est)
        latency = matrix.sum(axis=1)
        energy = model.features @ energy_weights(est, self.energy)
        if model.head_factors(est) is not None:  # the heads' energy at their corrected times
            energy = energy + self.energy.compute_w * (
                matrix[:, 0] - np.nan_to_num(model.head) * est.device_slowdown
            )
        objective = latency + self.energy_weight * energy
        if self._z and est.uplink_sd:  # the upload at the uplink's quantile (as in decide)
            objective = objective + matrix[:, STAGES.index("uplink")] * math.expm1(self._z * est.uplink_sd)
        if self.hedged:  # a sent request costs its expected time with the hedge (as in decide)
            heads = model.device_heads(est)
            finish = heads[-1] - heads[model.cut]
            up = matrix[:, STAGES.index("uplink")]
            cloud = matrix[:, 2:].sum(axis=1)
            objective = objective - np.array(
                [
                    cloud[i] - expected_hedged(float(cloud[i]), float(up[i]), float(finish[i]), est.uplink_sd)
                    if model.sent[i]
                    else 0.0
                    for i in range(len(model))
                ]
            )
        allowed = np.zeros(len(model), dtype=bool)
        allowed[self._rows] = True
        order = sorted(
            range(len(model)), key=lambda i: (not allowed[i], objective[i] if allowed[i] else latency[i])
        )
        candidates = []
        for i in order:
            sent = bool(model.sent[i])
            stages = dict(zip(STAGES, matrix[i].tolist())) if sent else {"head": float(matrix[i, 0])}
            fid = float(model.fidelity[i])
            size = float(model.bytes[i])
            candidates.append(
                Candidate(
                    cut=int(model.cut[i]),
                    cut_name=model.cut_names[int(model.cut[i])],
                    codec=model.codec(i),
                    predicted_s=float(latency[i]),
                    objective=float(objective[i]),
                    energy_j=float(energy[i]),
                    stages=stages,
                    fidelity=None if math.isnan(fid) else fid,
                    bytes=None if math.isnan(size) else size,
                    excluded="" if allowed[i] else (self._excluded[i] or f"not a {self.name} candidate"),
                )
            )
        winner, w_row = candidates[0], order[0]
        heads = model.device_heads(est)
        finish = float(heads[-1] - heads[model.cut[w_row]])
        decision = Decision(
            cut=winner.cut,
            codec=winner.codec,
            predicted_s=winner.predicted_s,
            stages=winner.stages,
            energy_j=winner.energy_j,
            finish_s=finish if model.sent[w_row] else 0.0,
            exit_cut=None if model.exit_cut[w_row] < 0 else int(model.exit_cut[w_row]),
            exit_rate=float(model.exit_rate[w_row]),
        )
        reason = self._reason(candidates)
        if model.sent[w_row]:
            from splitinfer.partitioner._hedge import cloud_seconds, hedge_after

            reason += (
                f"\nhedge: an answer not back {hedge_after(decision, est) * 1000:.0f} ms after sending "
                f"(predicted {cloud_seconds(decision) * 1000:.0f} ms) is finished on the device "
                f"({finish * 1000:.0f} ms from cut {winner.cut}); the first of the two answers is used."
            )
        return Explanation(self.name, est, decision, tuple(candidates), reason)

    def _reason(self, candidates: list[Candidate]) -> str:
        allowed = [c for c in candidates if c.feasible]
        w = allowed[0]
        what = "latency" if not self.energy_weight else f"latency + {self.energy_weight:g} s/J x energy"
        text = [
            f"winner: {_label(w)}: {w.predicted_s * 1000:.1f} ms predicted"
            + (f", {w.energy_j:.3f} J" if self.energy_weight else "")
            + f"; the least predicted {what} of {len(allowed)} allowed candidate(s)"
            + (f" ({self.settings})" if self.settings else "")
            + "."
        ]
        if len(allowed) > 1:
            r = allowed[1]
            diffs = sorted(
                ((s, w.stages.get(s, 0.0) - r.stages.get(s, 0.0)) for s in STAGES),
                key=lambda d: -abs(d[1]),
            )
            gaps = ", ".join(f"{s} {d * 1000:+.1f} ms" for s, d in diffs[:3] if abs(d) > 5e-5)
            text.append(
                f"runner-up: {_label(r)}: {r.predicted_s * 1000:.1f} ms "
                f"({(r.objective - w.objective) / max(w.objective, 1e-12) * 100:+.1f}% objective); "
                f"winner minus runner-up by stage: {gaps or 'equal'}."
            )
        local = next((c for c in candidates if c.cut == self.model.n), None)
        if local is not None and local is not w:
            text.append(f"all on the device (cut {local.cut}): {local.predicted_s * 1000:.1f} ms.")
        counts: dict[str, int] = {}
        for c in candidates:
            if not c.feasible:
                key = c.excluded.split(" (")[0]
                counts[key] = counts.get(key, 0) + 1
        if counts:
            text.append("not allowed: " + "; ".join(f"{n} {why}" for why, n in sorted(counts.items())) + ".")
        if self.explore:
            text.append(
                f"exploration: {self.explore:.0%} of decisions take another allowed candidate within "
                f"{self.explore_margin:.0%} of the winner."
            )
        return "\n".join(text)


def _label(c: Candidate) -> str:
    if "rtt" not in c.stages:
        return f"cut {c.cut} (all on the device)"
    return f"cut {c.cut} ({c.cut_name}) with {c.codec}"


def _rate(bps: float) -> str:
    if bps >= 1e9:
        return f"{bps / 1e9:.3g} Gbit/s"
    if bps >= 1e6:
        return f"{bps / 1e6:.3g} Mbit/s"
    return f"{bps / 1e3:.3g} kbit/s"


def _check_floor(bundle: Manifest, privacy_floor: Any) -> int | None:
    if privacy_floor is None:
        return None
    if not isinstance(privacy_floor, int) or isinstance(privacy_floor, bool):
        raise ConfigError(f"privacy_floor must be a cut index (int) or None, got {privacy_floor!r}")
    if not 0 <= privacy_floor <= bundle.last_cut:
        raise ConfigError(
            f"privacy_floor must be in 0..{bundle.last_cut} (the last cut), got {privacy_floor}"
        )
    return privacy_floor


@dataclass(frozen=True)
class _Budget:
    """A policy's fidelity budget: an agreement or an accuracy drop, at a confidence."""

    agreement: float
    drop: float | None
    confidence: float

    def exclusions(self, model: CostModel, floor: int | None) -> list[str]:
        return model.exclusions(self.agreement, floor, confidence=self.confidence, accuracy_drop=self.drop)

    def __str__(self) -> str:
        what = f"fidelity budget {self.agreement}" if self.drop is None else f"accuracy drop <= {self.drop}"
        return f"{what} at confidence {self.confidence:g}"


def _budget(fidelity_budget: float | None, accuracy_drop: float | None, confidence: float) -> _Budget:
    """The budget of ``accuracy_drop`` where given (``fidelity_budget`` is then not applied:
    EdgeClient passes its default agreement budget to every policy), else of ``fidelity_budget``
    (default 0.99)."""
    check_number("confidence", confidence, lo=0.5, hi=1.0)
    if not 0.5 < confidence < 1.0:
        raise ConfigError(f"confidence must be above 0.5 and below 1 (e.g. 0.95), got {confidence}")
    if accuracy_drop is not None:
        check_number("accuracy_drop", accuracy_drop, lo=0.0, hi=1.0)
        return _Budget(0.0, float(accuracy_drop), float(confidence))
    budget = 0.99 if fidelity_budget is None else fidelity_budget
    check_number("fidelity_budget", budget, lo=0.0, hi=1.0)
    return _Budget(float(budget), None, float(confidence))


def _needs_profile(name: str, model: CostModel, bundle: Manifest) -> None:
    if not model.profiled:
        raise ConfigError(
            f"policy {name} needs a profile of bundle {bundle.name!r}: measure one with "
            f"`splitinfer profile BUNDLE` or compile(..., profile=True)"
        )


def adaptive(
    bundle: Manifest,
    *,
    fidelity_budget: float | None = None,
    accuracy_drop: float | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    privacy_floor: int | None = None,
    energy_weight: float = 0.0,
    energy: EnergyModel | None = None,
    explore: float = 0.05,
    explore_margin: float = 0.1,
    seed: int | None = None,
    profile: str | None = None,
    cloud_batch: int = 1,
    objective: str = "mean",
    hedge: bool = False,
) -> TablePolicy:
    """Least predicted latency (+ ``energy_weight`` s/J x energy) under the budget and floor;
    ``objective="p95"``: the latency at the uplink's 5 % quantile (see TablePolicy).
    ``hedge``: the mean objective prices a sent request with its hedge (the client finishes an
    overdue one on the device, ``EdgeClient``'s default): its expected time under the uplink's
    current uncertainty, ``E[min(cloud, hedge_after + finish)]``. Off by default until the
    replay has measured it (benchmarks/bench_policy.py's ``adaptive-priced`` row).
    The budget: ``fidelity_budget`` or ``accuracy_drop`` at ``confidence`` (module docstring)."""
    budget = _budget(fidelity_budget, accuracy_drop, confidence)
    floor = _check_floor(bundle, privacy_floor)
    model = CostModel(bundle, profile=profile, cloud_batch=cloud_batch)
    _needs_profile("adaptive", model, bundle)
    excluded = budget.exclusions(model, floor)
    allowed = np.array([not r for r in excluded])
    return TablePolicy(
        "adaptive",
        model,
        allowed,
        excluded,
        energy_weight=energy_weight,
        energy=energy,
        explore=explore,
        explore_margin=explore_margin,
        seed=seed,
        settings=f"{budget}, privacy floor {floor}"
        + ("" if objective == "mean" else f", objective {objective}")
        + (", hedge priced" if hedge and objective == "mean" else ""),
        objective=objective,
        hedged=hedge,
    )


def static(
    bundle: Manifest,
    *,
    cut: int,
    codec: str,
    profile: str | None = None,
    cloud_batch: int = 1,
    allow_unmeasured: bool = False,
) -> TablePolicy:
    """Always ``cut`` with ``codec`` (the codec is ignored at the last cut).

    A lossy codec at a cut where the bundle's fidelity table has no row for it (its fidelity
    is unknown: compile measures lossy codecs at every cut only for models of at most 32 cuts,
    see docs/partitioning.md) is refused unless ``allow_unmeasured=True``, which logs a warning.
    """
    bundle.cut(cut)
    if codec not in bundle.codecs:
        raise ConfigError(f"bundle {bundle.name!r} offers codecs {', '.join(bundle.codecs)}; not {codec!r}")
    missing = unrunnable(codec)
    if missing is not None and cut != bundle.last_cut:
        raise ConfigError(f"static cut {cut} with {codec} cannot run here: {missing}")
    model = CostModel(bundle, profile=profile, cloud_batch=cloud_batch)
    if cut == model.n:
        row = model.local
    else:
        row = int(np.flatnonzero((model.cut == cut) & (model.codec_index == model.codecs.index(codec)))[0])
        if math.isnan(float(model.fidelity[row])):
            unknown = (
                f"bundle {bundle.name!r} has no fidelity row for lossy codec {codec} at cut {cut}: "
                "its effect on the outputs was never measured"
            )
            if not allow_unmeasured:
                raise ConfigError(
                    f"{unknown}. Measure it (compile with fidelity_all_cuts=True), pick a cut or codec "
                    "with a row (splitinfer inspect marks the unmeasured ones), or pass "
                    "allow_unmeasured=True to use it anyway"
                )
            log.warning("%s; using it because allow_unmeasured=True", unknown)
    allowed = np.zeros(len(model), dtype=bool)
    allowed[row] = True
    return TablePolicy("static", model, allowed, [""] * len(model), settings=f"cut {cut}, codec {codec}")


def local(bundle: Manifest, *, profile: str | None = None) -> TablePolicy:
    """Always the last cut: the whole model on the device."""
    model = CostModel(bundle, profile=profile)
    allowed = np.zeros(len(model), dtype=bool)
    allowed[model.local] = True
    return TablePolicy("local", model, allowed, [""] * len(model), settings="all on the device")


def cloud(
    bundle: Manifest,
    *,
    fidelity_budget: float | None = None,
    accuracy_drop: float | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    profile: str | None = None,
    cloud_batch: int = 1,
) -> TablePolicy:
    """Cut 0 with the input codec of least predicted latency meeting the budget
    (``fidelity_budget`` or ``accuracy_drop`` at ``confidence``, module docstring).

    Without a profile the choice is the smallest such codec (compute times are unknown).
    """
    budget = _budget(fidelity_budget, accuracy_drop, confidence)
    model = CostModel(bundle, profile=profile, cloud_batch=cloud_batch)
    excluded = budget.exclusions(model, None)
    allowed = np.array([not r for r in excluded]) & (model.cut == 0)
    if not allowed.any():
        raise ConfigError(
            f"no codec of bundle {bundle.name!r} at cut 0 meets the {budget}; "
            f"offer a lossless one (f32, f32+zstd1) or lower the budget"
        )
    if not model.profiled:
        rows = np.flatnonzero(allowed)
        smallest = rows[int(np.argmin(model.bytes[rows]))]
        allowed = np.zeros(len(model), dtype=bool)
        allowed[smallest] = True
    return TablePolicy(
        "cloud",
        model,
        allowed,
        [e or ("not cut 0" if model.cut[i] != 0 else "") for i, e in enumerate(excluded)],
        settings=f"cut 0, {budget}",
    )


def neurosurgeon(
    bundle: Manifest, *, privacy_floor: int | None = None, profile: str | None = None, cloud_batch: int = 1
) -> TablePolicy:
    """The best cut by predicted latency, sending float32 without compression (codec ``f32``)."""
    if "f32" not in bundle.codecs:
        raise ConfigError(f"policy neurosurgeon sends codec f32, which bundle {bundle.name!r} does not offer")
    floor = _check_floor(bundle, privacy_floor)
    model = CostModel(bundle, profile=profile, cloud_batch=cloud_batch)
    _needs_profile("neurosurgeon", model, bundle)
    excluded = model.exclusions(1.0, floor)
    f32 = model.codecs.index("f32")
    excluded = [
        e or ("" if model.codec_index[i] == f32 or i == model.local else "not f32")
        for i, e in enumerate(excluded)
    ]
    allowed = np.array([not r for r in excluded])
    return TablePolicy("neurosurgeon", model, allowed, excluded, settings=f"codec f32, privacy floor {floor}")


#: Policy name -> constructor ``(bundle, **kwargs) -> Policy``.
POLICIES: dict[str, Callable[..., TablePolicy]] = {
    "adaptive": adaptive,
    "static": static,
    "local": local,
    "cloud": cloud,
    "neurosurgeon": neurosurgeon,
}


def make_policy(name: str, bundle: Manifest, **kwargs: Any) -> TablePolicy:
    """The policy ``name`` for ``bundle``; ``kwargs`` are that policy's settings.

    Every built-in policy is a :class:`TablePolicy`, a :class:`Policy` over the bundle's cost
    model: code that needs that model and the rows the policy allows (the hindsight oracle)
    reads ``policy.model`` and ``policy.rows``; code that only decides uses the Policy protocol.

    ``adaptive``: fidelity_budget=0.99 (or accuracy_drop=...), confidence=0.9,
    privacy_floor=None, energy_weight=0.0 (seconds per joule), energy=EnergyModel(),
    explore=0.05, explore_margin=0.1, seed=None, profile=None, cloud_batch=1, objective="mean"
    (or "p95"), hedge=False. ``static``: cut, codec, profile, cloud_batch, allow_unmeasured=False.
    ``local``: profile. ``cloud``: fidelity_budget or accuracy_drop, confidence, profile,
    cloud_batch. ``neurosurgeon``: privacy_floor, profile, cloud_batch. ``profile`` names one
    of ``bundle.profiles`` (default ``host``, else the first); ``cloud_batch`` is the batch
    size whose profiled tail times the cloud's latency.
    Raises ConfigError for an unknown name or setting.
    """
    factory = POLICIES.get(name)
    if factory is None:
        raise ConfigError(f"unknown policy {name!r}; valid policies: {', '.join(POLICIES)}")
    if not isinstance(bundle, Manifest):
        raise ConfigError(f"make_policy needs a splitinfer.Bundle or Manifest, got {type(bundle).__name__}")
    signature = inspect.signature(factory)
    try:
        signature.bind(bundle, **kwargs)
    except TypeError as exc:
        accepted = [p for p in signature.parameters if p != "bundle"]
        raise ConfigError(
            f"policy {name}: {exc}; it accepts {', '.join(accepted) if accepted else 'no settings'}"
        ) from None
    return factory(bundle, **kwargs)
