"""splitinfer.netem: a trace-driven link emulator, a TCP proxy that shapes each direction.

Each direction of every connection through the proxy is released at the rate a bandwidth trace
gives at that moment, then delivered a one-way delay later; the links are shared by all
connections, like one radio (:class:`LinkEmulator`).

>>> async with LinkEmulator(upstream=("127.0.0.1", 8080), uplink=BandwidthTrace.load("norway-3g-train-1"),
...                         delay_s=0.04) as emulator:
...     url = f"http://127.0.0.1:{emulator.port}"

Traces are ``<seconds> <Mbit/s>`` per line (looped); the real ones that ship with splitinfer
load by name (:func:`shipped_traces`); :data:`PROFILES` names typical networks. docs/netem.md
describes the emulator and how it was checked. Torch-free; ``splitinfer netem`` runs it.
"""

from __future__ import annotations

from splitinfer._units import parse_duration, parse_rate
from splitinfer.netem._link import LinkEmulator
from splitinfer.netem._trace import PROFILES, BandwidthTrace, NetworkProfile, shipped_traces

__all__ = [
    "PROFILES",
    "BandwidthTrace",
    "LinkEmulator",
    "NetworkProfile",
    "parse_duration",
    "parse_rate",
    "shipped_traces",
]
