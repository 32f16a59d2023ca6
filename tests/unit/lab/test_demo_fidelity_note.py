"""The demo says how its fidelity table was measured and on how many inputs (issue 28 item 8)."""

from __future__ import annotations

from splitinfer.lab._demo import fidelity_note


def test_held_out_fidelity_names_its_inputs_and_the_rule():
    note = fidelity_note(
        {"metric": "top1", "samples": 48, "calibration_samples": 24, "held_out": True, "table": []}
    )
    assert note.startswith("fidelity: top-1 agreement with the uncompressed model")
    assert "48 held-out" in note and "24 calibration crops" in note
    assert "measured agreement meets the budget (one miss in 48 is 2.1%)" in note


def test_in_sample_fidelity_says_so_and_an_interval_rule_is_named():
    note = fidelity_note({"metric": "top1", "samples": 24, "held_out": False, "confidence": 0.95})
    assert "24 calibration crops themselves (in-sample" in note
    assert "lower bound of its 95% interval meets the budget" in note
