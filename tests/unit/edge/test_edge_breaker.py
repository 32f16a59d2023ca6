"""The circuit breaker's state machine, on a controlled clock."""

import pytest

from splitinfer.edge._breaker import CircuitBreaker
from splitinfer.errors import ConfigError


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_opens_after_consecutive_failures_and_probes_once_after_the_reset_time():
    clock = Clock()
    b = CircuitBreaker(failures_to_open=3, reset_after_s=5.0, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state == "closed"
    b.success()  # a success resets the count
    for _ in range(3):
        b.failure()
    assert b.state == "open"
    assert not b.allow()
    clock.now = 4.9
    assert not b.allow()
    clock.now = 5.0
    assert b.allow()  # the one probe
    assert b.state == "half_open"
    assert not b.allow()  # no second probe while the first is out
    b.failure()
    assert b.state == "open"
    clock.now = 9.0
    assert not b.allow()
    clock.now = 10.0
    assert b.allow()
    b.success()
    assert b.state == "closed"
    assert b.allow() and b.allow()


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"failures_to_open": 0}, "failures"), ({"reset_after_s": 0}, "reset")]
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CircuitBreaker(**kwargs)
