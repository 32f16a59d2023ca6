"""The profile's stability and consistency rules, fed times (no clock): issue 28 item 5."""

from __future__ import annotations

import pytest

from splitinfer.errors import ConfigError
from splitinfer.partitioner._profiling import (
    NEIGHBOUR_RATIO,
    TOO_HIGH,
    TOO_LOW,
    Suspect,
    _fit_to_chain,
    busy_warning,
    clock_for,
    is_stable,
    suspects,
    typical,
)

CHAIN = [0.010, 0.011, 0.010, 0.012, 0.010]


def test_a_median_is_stable_once_more_samples_stop_moving_it():
    assert not is_stable([0.01, 0.01])  # too few to say
    assert is_stable([0.010, 0.011, 0.010, 0.0105, 0.010, 0.0102])
    # the last third doubles: the median moved by far more than a tenth
    assert not is_stable([0.010, 0.010, 0.010, 0.030, 0.030, 0.030, 0.030])
    assert is_stable([0.010, 0.010, 0.010, 0.012], tolerance=0.25)


def test_consistent_segments_are_not_suspect():
    segs = [[0.002, 0.0021, 0.002, 0.0022, 0.002], [0.005] * 5, [0.003, 0.0031, 0.003, 0.003, 0.0032]]
    assert suspects(segs, [CHAIN] * 3) == []


def test_a_segment_longer_than_the_whole_chain_is_too_high():
    segs = [[0.002] * 5, [0.030, 0.031, 0.029, 0.030, 0.030], [0.003] * 5]
    found = suspects(segs, [CHAIN] * 3)
    assert [(s.segment, s.direction, s.hard) for s in found] == [(1, TOO_HIGH, True)]
    assert "longer than the whole chain" in found[0].reason


def test_a_segment_slowed_in_most_of_its_rounds_is_too_high():
    # the code a segment runs does not change between rounds: a median 4x its fastest run means
    # other work slowed most of them
    found = suspects([[0.001, 0.004, 0.0042, 0.0041, 0.001]], [CHAIN])
    assert [(s.segment, s.direction, s.hard) for s in found] == [(0, TOO_HIGH, True)]
    assert "its fastest run" in found[0].reason
    assert suspects([[0.001, 0.0012, 0.0011, 0.0013, 0.001]], [CHAIN]) == []


def test_neighbours_flag_an_outlier_both_ways_but_not_as_impossible():
    low = [[0.002] * 5, [0.002 / (2 * NEIGHBOUR_RATIO)] * 5, [0.002] * 5]
    found = suspects(low, [CHAIN] * 3)
    assert [(s.segment, s.direction, s.hard) for s in found] == [(1, TOO_LOW, False)]
    high = [[0.0001] * 5, [0.0001 * 2 * NEIGHBOUR_RATIO] * 5, [0.0001] * 5]
    found = suspects(high, [CHAIN] * 3)
    assert [(s.segment, s.direction, s.hard) for s in found] == [(1, TOO_HIGH, False)]


def test_suspects_needs_a_chain_series_per_segment():
    with pytest.raises(ConfigError, match="2 segments but 1 chain"):
        suspects([[0.1], [0.1]], [CHAIN])


def test_the_warning_names_the_direction_and_the_segments():
    found = [
        Suspect(3, TOO_HIGH, "1.58 ms, 9.6x its fastest run"),
        Suspect(7, TOO_LOW, "0.00094 ms beside 0.071"),
    ]
    names = [f"block {i}" for i in range(10)]
    text = busy_warning("m", [0.0007, 0.0008], 0.2, found, names)
    assert text is not None
    assert "far too high or too low" in text
    assert "1 segment time(s) too high: segment 3 (to block 3)" in text
    assert "1 segment time(s) too low: segment 7 (to block 7)" in text
    assert "splitinfer profile" in text
    # a wild spread only ever reads too high: other work slows runs down, never speeds them up
    wild = busy_warning("m", [0.0007, 0.098, 0.0009], 0.2)
    assert wild is not None and "far too high," in wild and "too low" not in wild
    assert busy_warning("m", [0.0007, 0.0008, 0.0009], 0.2, ()) is None


def test_a_burst_in_the_segments_does_not_drive_short_segments_to_nothing():
    # The chain 10 ms; a burst made the segments' sum 3x the chain. Before, the mean excess
    # (5.3 ms) was subtracted from each, leaving the 1 ms segment at a tenth of its time, then
    # scaled down again: 0.05 ms, 20x too low (0.94 us for a 71 us conv in issue 28).
    medians = [0.0002, 0.0010, 0.0100, 0.0200]
    fitted = _fit_to_chain(medians, medians, full=0.010)["median_s"]
    assert sum(fitted) == pytest.approx(0.010)
    share = fitted[1] / sum(fitted)
    assert share >= 0.8 * medians[1] / sum(medians)  # kept in proportion, not driven to nothing
    # plain overhead (the sum a little over the chain) is still taken off every segment alike
    fitted = _fit_to_chain([0.0011, 0.0021, 0.0031], [0.0011, 0.0021, 0.0031], full=0.006)["median_s"]
    assert fitted == pytest.approx([0.001, 0.002, 0.003], rel=1e-6)


def test_one_thread_is_timed_by_its_cpu_time_more_by_the_wall_clock():
    import time

    assert clock_for(1) == ("cpu", time.thread_time)
    assert clock_for(4) == ("wall", time.perf_counter)
    assert clock_for(0)[0] == "wall"  # a runtime's default pool


def test_the_typical_time_is_the_lower_quartile_other_work_only_adds():
    quiet = [0.010, 0.0101, 0.0102, 0.0103, 0.0104]
    assert typical(quiet) == pytest.approx(0.0101)  # as good as the median on a quiet machine
    busy = [0.010, 0.0101, 0.030, 0.045, 0.050, 0.060, 0.070, 0.080]  # most runs slowed
    assert typical(busy) == 0.0101
    assert typical([0.02]) == 0.02
