"""Running work on the device, and emulating a slower device (``device_slowdown``).

Only the device's own model and codec work is emulated: the segments a head or a local tail
runs, and the codec's encode. Checking the inputs, handing work to a worker thread and back,
and the client's bookkeeping are this host's overhead, not the device's; scaled by N they made
a cut-0 request's head (no model code at all) take 200 times the input check.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from splitinfer.bundle import Bundle

__all__ = ["Device", "Emulation", "MeasuredEmulation", "ProfileEmulation", "is_numpy", "make_emulation"]

T = TypeVar("T")


class Emulation(Protocol):
    """How long to wait after work that took ``took`` seconds here (``elapsed`` since it was
    handed over), for a device ``slowdown`` times slower; ``profiled_s``: the profile's time."""

    slowdown: float

    def extra_s(self, took: float, elapsed: float, profiled_s: float | None) -> float: ...


class MeasuredEmulation:
    """The device takes N times what the work took on this host."""

    def __init__(self, slowdown: float):
        self.slowdown = slowdown

    def extra_s(self, took: float, elapsed: float, profiled_s: float | None) -> float:
        return took * (self.slowdown - 1.0)


class ProfileEmulation(MeasuredEmulation):
    """The device takes the profiled time times N (at least what the work took here), so that
    contention on a host shared by many emulated devices is not multiplied into device time;
    work with no profiled time is measured."""

    def extra_s(self, took: float, elapsed: float, profiled_s: float | None) -> float:
        if profiled_s is None:
            return super().extra_s(took, elapsed, profiled_s)
        return max(0.0, profiled_s * self.slowdown - elapsed)


def make_emulation(mode: str, slowdown: float) -> Emulation | None:
    """The emulation ``mode`` (``measured`` or ``profile``) of an N-times-slower device; None
    for this machine's own speed."""
    if slowdown <= 1.0:
        return None
    return ProfileEmulation(slowdown) if mode == "profile" else MeasuredEmulation(slowdown)


def is_numpy(tensors: Sequence[Any]) -> bool:
    """Whether ``tensors`` are numpy arrays (their answer is decoded to numpy too)."""
    return bool(tensors) and all(type(t).__module__ == "numpy" for t in tensors)


class Device:
    """Runs the device's work off the event loop, as slowly as the emulated device would."""

    def __init__(self, emulation: Emulation | None):
        self.emulation = emulation

    @property
    def slowdown(self) -> float:
        return 1.0 if self.emulation is None else self.emulation.slowdown

    async def run(
        self, fn: Callable[..., T], *args: object, profiled_s: float | None = None
    ) -> tuple[T, float]:
        """``fn(*args)`` in a worker thread, then the rest of the emulated device's time;
        the result and the seconds it took the device. Only ``fn``'s own time is scaled."""
        t0 = time.perf_counter()
        result, took = await asyncio.to_thread(_timed, fn, *args)
        await self._wait(took, t0, profiled_s)
        return result, time.perf_counter() - t0

    async def head(
        self, bundle: Bundle, k: int, inputs: Sequence[Any], profiled_s: float | None
    ) -> tuple[tuple[Any, ...], float]:
        """The frontier at cut ``k`` for the model inputs, and the device's seconds: the input
        check runs at this host's speed, the segments ``0..k-1`` at the device's."""
        bundle.cut(k)
        return await self.segments(bundle.run_segments, 0, k, inputs, bundle.flatten_inputs, profiled_s)

    async def segments(
        self,
        run: Callable[[int, int, Sequence[Any]], T],
        start: int,
        stop: int,
        inputs: Sequence[Any],
        flatten: Callable[[Sequence[Any]], tuple[Any, ...]],
        profiled_s: float | None,
    ) -> tuple[T, float]:
        """``run(start, stop, flatten(inputs))``; only ``run`` is the device's work (none when
        ``start == stop``: no segment runs)."""
        t0 = time.perf_counter()
        result, took = await asyncio.to_thread(_timed_segments, run, start, stop, inputs, flatten)
        if stop > start:
            await self._wait(took, t0, profiled_s)
        return result, time.perf_counter() - t0

    async def time_head(
        self, bundle: Bundle, k: int, inputs: Sequence[Any], profiled_s: float | None
    ) -> float:
        """The device's seconds for the head of cut ``k``, scaled from this host's time rather
        than waited out (a warm-up measures the device; nobody waits for its answer)."""
        bundle.cut(k)
        _, took = await asyncio.to_thread(
            _timed_segments, bundle.run_segments, 0, k, inputs, bundle.flatten_inputs
        )
        return took + (0.0 if self.emulation is None else self.emulation.extra_s(took, took, profiled_s))

    async def _wait(self, took: float, t0: float, profiled_s: float | None) -> None:
        if self.emulation is not None:
            await asyncio.sleep(self.emulation.extra_s(took, time.perf_counter() - t0, profiled_s))


def _timed(fn: Callable[..., T], *args: object) -> tuple[T, float]:
    """``fn(*args)`` and the seconds it took, measured where it runs (a worker thread)."""
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


def _timed_segments(
    run: Callable[[int, int, Sequence[Any]], T],
    start: int,
    stop: int,
    inputs: Sequence[Any],
    flatten: Callable[[Sequence[Any]], tuple[Any, ...]],
) -> tuple[T, float]:
    flat = flatten(inputs)
    return _timed(run, start, stop, flat)
