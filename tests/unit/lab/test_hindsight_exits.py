"""The replay models early exits (issue 32): a request whose decision has an exit on its way is
answered on the device at the exit's time when its exit answers it, else it costs the path that
goes on (the exit head included). A tiny real bundle with a trained exit, profiled."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import splitinfer as si
from splitinfer.errors import ConfigError
from splitinfer.lab._hindsight import Link, World
from splitinfer.partitioner import make_policy
from tests.support.zoo import TinyClassifier
from tests.support.zoo import seeded_rows as _rows

DS = 4.0
RTT = 0.02


#: Profiled seconds of each segment and exit head: fixed, so that the replay's choices do not
#: follow the load of the machine the test runs on (profiling itself: test_edge_exits.py).
SEGMENT_S, EXIT_S = 1e-3, 1e-4


@pytest.fixture(scope="module")
def bundle() -> si.Bundle:
    b = si.compile(
        TinyClassifier().eval(),
        (torch.randn(1, 3, 8, 8),),
        name="tiny",
        codecs=["f32"],
        runtimes=("torch",),
        training=_rows(64, 1),
        exits=None,
        fidelity_budget=0.3,
        confidence=0.75,
        train_steps=60,
    )
    b.profiles["host"] = {
        "segments": {"1": {"median_s": [SEGMENT_S] * b.n_segments, "p90_s": [SEGMENT_S] * b.n_segments}},
        "codecs": [],
        "response_bytes": 44.0,
        "exits": {"1": {str(e["cut"]): EXIT_S for e in b.exits}},
    }
    return b


def _variant(bundle: si.Bundle, *, threshold: float | None, rate: float) -> si.Bundle:
    """The bundle with its first trained exit only, at ``threshold`` and exit rate ``rate``;
    ``threshold=None``: recorded, never answers (as compile stores an exit no threshold qualifies)."""
    b = copy.copy(bundle)
    first = next(e for e in bundle.exits if e["threshold"] is not None)
    b.exits = [dict(first, threshold=threshold, exit_rate=rate, file=first["file"] if threshold else None)]
    return b


def _plain(bundle: si.Bundle) -> si.Bundle:
    b = copy.copy(bundle)
    b.exits = []
    return b


def _link() -> Link:
    # 2 Mbit/s for 10 s, then 0.2 for 10 s
    return Link.from_samples("steps", np.array([0.0, 10.0]), np.array([2.0, 0.2]), 20.0)


def _replay(bundle: si.Bundle, policy_name: str, **world: object) -> tuple[list[float], int, World]:
    """A request every 0.1 s for 20 s under ``policy_name`` (its decision on fixed estimates):
    each request's latency, how many exited, and the world."""
    policy = make_policy(policy_name, bundle, **({"explore": 0.0} if policy_name == "adaptive" else {}))
    w = World(make_policy("adaptive", bundle, explore=0.0), _link(), DS, **world)  # type: ignore[arg-type]
    out, exited = [], 0
    for request, t in enumerate(np.arange(0.0, 20.0, 0.1).tolist()):
        latency, row = w.causal(policy, t, RTT, hedged=True, request=request)
        out.append(latency)
        exited += w.exited(request, row)
    return out, exited, w


@pytest.mark.parametrize("policy", ["local", "adaptive"])
def test_an_exit_that_answers_lowers_the_replays_mean_and_one_that_never_does_changes_nothing(bundle, policy):
    plain, _, _ = _replay(_plain(bundle), policy)
    never, never_exited, _ = _replay(_variant(bundle, threshold=None, rate=0.0), policy)
    answers, exited, world = _replay(_variant(bundle, threshold=0.5, rate=0.5), policy)
    assert never == plain and never_exited == 0  # threshold null: the exit is not on any path
    assert 0.35 < exited / len(answers) < 0.65  # a seeded draw per request at the exit's rate
    assert np.mean(answers) < np.mean(plain)
    e = world.exit_cut[world.local]
    assert e >= 0
    # an exited request costs the head to the exit and the exit head, on the device
    assert world.model.exit_time[world.local] == EXIT_S
    assert min(answers) == pytest.approx((e * SEGMENT_S + EXIT_S) * DS)


def test_the_draws_are_seeded_and_shared_by_every_candidate(bundle):
    b = _variant(bundle, threshold=0.5, rate=0.3)
    policy = make_policy("adaptive", b, explore=0.0)
    a, again, other = (World(policy, _link(), DS, exit_seed=s) for s in (7, 7, 8))
    rows = policy.rows[a.exit_cut[policy.rows] >= 0]
    assert rows.size >= 2
    first = [a.exited(j, int(rows[0])) for j in range(300)]
    assert first == [again.exited(j, int(rows[0])) for j in range(299, -1, -1)][::-1]  # any order
    assert first != [other.exited(j, int(rows[0])) for j in range(300)]
    for j in range(50):  # one request's input exits on every candidate with that exit, or on none
        assert len(set(a.exits(j, rows).tolist())) == 1


def test_real_held_out_outcomes_are_replayed_in_turn(bundle):
    first = next(e for e in bundle.exits if e["threshold"] is not None)
    b = _variant(bundle, threshold=first["threshold"], rate=0.5)
    e = first["cut"]
    held = torch.cat([r[0] for r in _rows(40, 5)])
    _, confident = bundle.run_exit(e, bundle.head(e, held))  # each held-out input: does it exit?
    world = World(make_policy("local", b), _link(), DS, exit_outcomes={e: confident})
    local = world.local
    got = [world.exited(j, local) for j in range(80)]
    assert got == confident + confident
    lat = [float(world.latencies(np.array([local]), 0.0, RTT, j)[0]) for j in range(40)]
    exit_s, went_on = float(world.exit_s[local]), float(world.device_s[local])
    assert lat == [exit_s if c else went_on for c in confident] and exit_s < went_on
    with pytest.raises(ConfigError, match="exit_outcomes"):
        World(make_policy("local", b), _link(), DS, exit_outcomes={e: []})


def test_the_oracle_knows_which_requests_exit(bundle):
    b = _variant(bundle, threshold=0.5, rate=0.5)
    policy = make_policy("adaptive", b, explore=0.0)
    world = World(policy, _link(), DS)
    plain_policy = make_policy("adaptive", _plain(bundle), explore=0.0)
    plain = World(plain_policy, _link(), DS)
    overhead = float(world.model.exit_time.max()) * DS  # what trying an exit adds to going on
    rows = policy.rows
    seen = 0
    for j, t in enumerate(np.arange(0.0, 20.0, 0.5).tolist()):
        with_exit, _ = world.oracle(rows, t, RTT, j)
        without, _ = plain.oracle(plain_policy.rows, t, RTT)
        assert with_exit <= without + overhead + 1e-12
        answering = rows[world.exits(j, rows)]
        if answering.size:
            seen += 1
            assert with_exit <= float(world.exit_s[answering].min()) + 1e-12
    assert seen
