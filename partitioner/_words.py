"""The words of the interface the user called, for messages that name an input or a setting.

``compile`` is reached from Python (``splitinfer.compile(..., evaluation=[...])``) and from the
command line (``splitinfer compile ... --evaluation DIR``); a message must name what the user
typed (issue 31). The CLI runs compile inside :func:`cli_words`; everywhere else the Python
keywords are used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["cli_words", "example", "name"]

_CLI: ContextVar[bool] = ContextVar("splitinfer_cli_words", default=False)

#: key -> (Python keyword, CLI flag)
_NAMES = {
    "calibration": ("calibration", "--calibration"),
    "evaluation": ("evaluation", "--evaluation"),
    "labels": ("labels", "the labels (image file names)"),
    "example_inputs": ("example_inputs", "--example-inputs/--input-shape"),
    "fidelity_all_cuts": ("fidelity_all_cuts=True", "--fidelity-all-cuts"),
    "codecs": ("codecs", "--codecs"),
    "fidelity_budget": ("fidelity_budget", "--budget"),
    "accuracy_drop": ("accuracy_drop", "--accuracy-drop"),
    "confidence": ("confidence", "--confidence"),
    "training": ("training", "--train"),
    "exits": ("exits", "--exits"),
    "bottleneck_cuts": ("bottleneck_cuts", "--bottleneck-cuts"),
}
#: key -> (Python example, CLI example)
_EXAMPLES = {
    "calibration": ("calibration=[inputs, ...]", "--calibration FILE|DIR"),
    "evaluation": ("evaluation=[inputs, ...]", "--evaluation FILE|DIR"),
    "fidelity_all_cuts": ("compile with fidelity_all_cuts=True", "compile with --fidelity-all-cuts"),
}


@contextmanager
def cli_words() -> Iterator[None]:
    """Messages raised or logged inside name the CLI's flags."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


def name(key: str) -> str:
    """The name of the input or setting ``key`` in the interface in use."""
    return _NAMES[key][int(_CLI.get())]


def example(key: str) -> str:
    """How to give ``key`` in the interface in use."""
    return _EXAMPLES[key][int(_CLI.get())]
