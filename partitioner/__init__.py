"""splitinfer.partitioner: graph capture, cuts and segments (and, later, the per-request decision)."""

from splitinfer.partitioner._capture import compile

__all__ = ["compile"]
