"""The work of a batch: decode frames, run the tail once, encode per request.

:func:`run_batch` is a plain function of its inputs (no asyncio, no aiohttp), called in a
compute thread. It never raises for one bad request: each job gets its own result or Problem.

Frames and outputs of at most :data:`SMALL_BYTES` are decoded and encoded on the event loop
instead (:func:`decode_frame`, :func:`encode_outputs`): for them, the Python work of a codec is
a few microseconds, while each handoff of the GIL between the loop and a compute thread costs
far more. The tail itself always runs in a compute thread.

A batch may hold requests of several models whose tails begin with the same segments (models
fine-tuned from one backbone, loaded with shared weights: equal segments are one object). Those
segments run once for the whole batch, and a frontier that several requests carry (one upload
for several task models) enters them once; then each model's own segments run on its rows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from splitinfer.bundle import Bundle
from splitinfer.cloud._problem import Problem
from splitinfer.compression import get_codec
from splitinfer.errors import CodecError
from splitinfer.tensors import TensorSpec, specs_of

__all__ = ["SMALL_BYTES", "Answer", "Encoder", "Frame", "decode_frame", "finish", "run_batch"]

log = logging.getLogger("splitinfer.cloud")

#: Payloads and outputs up to this size are decoded and encoded on the event loop.
SMALL_BYTES = 64 * 1024


#: Turns one request's outputs into its response body (in a compute thread when they are large).
Encoder = Callable[[Sequence[torch.Tensor]], bytes]


class Encoded(Protocol):
    """What decoding a payload needs to know: the cut, the codec, the tensors it must hold."""

    @property
    def cut(self) -> int: ...
    @property
    def codec(self) -> str: ...
    @property
    def tensors(self) -> tuple[TensorSpec, ...]: ...


@dataclass(frozen=True)
class Frame:
    """One request's frontier at ``cut``, checked against its model: encoded (``payload`` in
    ``codec``) or decoded already (``frontier``), whatever protocol it arrived in."""

    cut: int
    tensors: tuple[TensorSpec, ...]
    #: Rows along dim 0 (the request's own batch size).
    rows: int
    request_id: str = ""
    codec: str = ""
    payload: memoryview = field(default_factory=lambda: memoryview(b""), compare=False)
    #: The decoded frontier when it was decoded already, and how long that took.
    frontier: list[torch.Tensor] | None = field(default=None, compare=False)
    decode_s: float = 0.0
    #: Encodes the outputs into the response body; None keeps them as tensors in the answer.
    encoder: Encoder | None = field(default=None, compare=False)


@dataclass
class Answer:
    """One request's response body (or outputs still to encode) and its stage times (seconds)."""

    body: bytes | None
    stages: dict[str, float]
    #: Rows in the batch this request was computed in.
    batch_rows: int
    #: Small outputs left for the event loop to encode (``body`` is None until it does).
    outputs: list[torch.Tensor] | None = None
    #: CPU seconds the computing thread spent on the batch's compute (the cost estimate).
    compute_cpu: float = 0.0
    #: Models whose requests ran through the batch's shared segments together (1: one model).
    batch_models: int = 1


def decode_frame(header: Encoded, payload: memoryview, bundle: Bundle | None = None) -> list[torch.Tensor]:
    """The frontier a checked frame carries; Problem (400) if it does not decode to what it declares
    (or names a zstd dictionary other than the one ``bundle`` holds for its cut and codec)."""
    max_nbytes = sum(s.nbytes() for s in header.tensors)
    try:
        codec = get_codec(header.codec) if bundle is None else bundle.decoder_for(header.cut, header.codec)
        frontier = codec.decode(payload, max_nbytes=max_nbytes)
    except CodecError as exc:
        raise Problem("malformed_frame", f"payload does not decode with {header.codec}: {exc}") from None
    if specs_of(frontier) != header.tensors:
        raise Problem("malformed_frame", "payload tensors differ from those the frame header declares")
    return frontier


def finish(answer: Answer, frame: Frame) -> None:
    """Encode the outputs an answer still carries with its frame's encoder (on the event loop:
    they are small); an answer whose frame has no encoder keeps its tensors."""
    if answer.body is None and answer.outputs is not None and frame.encoder is not None:
        t0 = time.perf_counter()
        answer.body = frame.encoder(answer.outputs)
        answer.outputs = None
        answer.stages["encode"] = time.perf_counter() - t0


def _frontier(frame: Frame, bundle: Bundle) -> tuple[list[torch.Tensor], float]:
    if frame.frontier is not None:
        return frame.frontier, frame.decode_s
    t0 = time.perf_counter()
    return decode_frame(frame, frame.payload, bundle), time.perf_counter() - t0


def _split(outputs: Sequence[torch.Tensor], rows: Sequence[int]) -> list[list[torch.Tensor]] | None:
    """Outputs cut back into each request's rows; None if an output is not batch-leading."""
    total = sum(rows)
    if any(o.dim() == 0 or o.shape[0] != total for o in outputs):
        return None
    parts: list[list[torch.Tensor]] = [[] for _ in rows]
    for out in outputs:
        for i, piece in enumerate(torch.split(out, list(rows), dim=0)):
            parts[i].append(piece)
    return parts


def _compute(
    bundle: Bundle,
    cut: int,
    frontiers: list[list[torch.Tensor]],
    device: torch.device,
    stop: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """The tail from ``cut`` (to segment ``stop``, by default the last) on ``device`` for the
    concatenated frontiers; the outputs on the host.

    On a CUDA device the batch is copied in through pinned memory, on this compute thread's own
    stream (one per thread: batches of different threads overlap), and the outputs copied back
    before the thread lets go of the batch. Frames are decoded on the host, before this.
    """
    inputs = [torch.cat(p, dim=0) for p in zip(*frontiers)] if len(frontiers) > 1 else frontiers[0]
    stop = bundle.n_segments if stop is None else stop
    if bundle.onnx_runner is not None:  # ONNX Runtime takes host arrays to its own device
        return bundle.run_segments(cut, stop, inputs)
    if device.type != "cuda":
        return bundle.run_segments(cut, stop, [t.to(device) for t in inputs])
    stream = _stream(device)
    with torch.cuda.stream(stream):
        moved = [t.pin_memory().to(device, non_blocking=True) for t in inputs]
        outputs = bundle.run_segments(cut, stop, moved)
        host = tuple(o.to(HOST, non_blocking=True) for o in outputs)
    stream.synchronize()
    return host


#: Where frames are decoded and answers encoded.
HOST = torch.device("cpu")
_streams = threading.local()


def _stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's CUDA stream on ``device`` (made on first use)."""
    streams: dict[torch.device, torch.cuda.Stream] = getattr(_streams, "by_device", None) or {}
    _streams.by_device = streams
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


def run_batch(
    bundle: Bundle,
    cut: int,
    frames: Sequence[Frame],
    started: float,
    device: torch.device,
    bundles: Sequence[Bundle] | None = None,
) -> list[Answer | Problem]:
    """Answer every frame of one batch (all at ``cut`` of ``bundle``, same non-batch shapes).

    ``bundles`` gives each frame's own model when the batch mixes models whose tails from
    ``cut`` begin with shared segments (see the module docstring); None: all are ``bundle``'s.

    The frames are decoded one by one (a frame that does not decode fails alone), concatenated
    along dim 0, run through the tail once and split back. If the batch fails, or its outputs
    are not batch-leading, each frame runs alone, so one hostile frame cannot fail the others.
    ``started`` is the perf_counter time the batch was dispatched (for the queue stage); the
    tail runs on ``device`` (where the bundle's segments were loaded).
    """
    begin = time.perf_counter()
    results: list[Answer | Problem | None] = [None] * len(frames)
    decoded: list[tuple[int, list[torch.Tensor], float]] = []
    owners = list(bundles) if bundles is not None else [bundle] * len(frames)
    for i, frame in enumerate(frames):
        try:
            decoded.append((i, *_frontier(frame, owners[i])))
        except Problem as p:
            results[i] = p
    mixed = len({id(owners[i]) for i, _, _ in decoded}) > 1 or len({id(f) for _, f, _ in decoded}) < len(
        decoded
    )
    if decoded and mixed:
        _run_shared(owners, cut, frames, decoded, results, begin - started, device)
    elif decoded:
        _run_decoded(owners[decoded[0][0]], cut, frames, decoded, results, begin - started, device)
    return [r if r is not None else Problem("internal", "the request was not computed") for r in results]


def _run_decoded(
    bundle: Bundle,
    cut: int,
    frames: Sequence[Frame],
    decoded: list[tuple[int, list[torch.Tensor], float]],
    results: list[Answer | Problem | None],
    hop: float,
    device: torch.device,
) -> None:
    rows = [frames[i].rows for i, _, _ in decoded]
    parts: list[list[torch.Tensor]] | None = None
    compute = cpu = 0.0
    if len(decoded) > 1:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            parts = _split(_compute(bundle, cut, [f for _, f, _ in decoded], device), rows)
        except Exception:
            log.warning(
                "a batch of %d at cut %d of %s failed; running its requests one by one",
                len(decoded),
                cut,
                bundle.name,
                exc_info=True,
            )
        compute, cpu = time.perf_counter() - t0, time.thread_time() - c0
    if parts is None:  # one request, or the batch could not be run or split: each alone
        for i, frontier, dec in decoded:
            results[i] = _answer_alone(bundle, cut, frames[i], frontier, dec, hop, device)
        return
    batch_rows = sum(rows)
    for (i, _, dec), outputs in zip(decoded, parts):
        stages = {"queue": hop, "decode": dec, "compute": compute}
        results[i] = _answer(frames[i], outputs, stages, batch_rows, cpu)


def _run_shared(
    owners: Sequence[Bundle],
    cut: int,
    frames: Sequence[Frame],
    decoded: list[tuple[int, list[torch.Tensor], float]],
    results: list[Answer | Problem | None],
    hop: float,
    device: torch.device,
) -> None:
    """A batch of several models (or one frontier for several): the segments their tails share
    run once on the distinct frontiers, then each model's own segments on its rows."""
    models = list({id(owners[i]): owners[i] for i, _, _ in decoded}.values())
    stop = _shared_stop(models, cut)
    distinct = list({id(f): f for _, f, _ in decoded}.values())
    place = {id(f): n for n, f in enumerate(distinct)}
    rows = [frames[next(i for i, g, _ in decoded if g is f)].rows for f in distinct]
    t0, c0 = time.perf_counter(), time.thread_time()
    answers: dict[int, list[torch.Tensor]] | None = None
    try:
        trunk = _split(_compute(models[0], cut, distinct, device, stop), rows)
        if trunk is not None:
            answers = {}
            for model in models:
                mine = [(i, place[id(f)]) for i, f, _ in decoded if owners[i] is model]
                parts = _split(
                    _compute(model, stop, [trunk[n] for _, n in mine], device),
                    [frames[i].rows for i, _ in mine],
                )
                if parts is None:
                    answers = None
                    break
                answers.update((i, out) for (i, _), out in zip(mine, parts))
    except Exception:
        log.warning(
            "a batch of %d requests of %s at cut %d failed; running them one by one",
            len(decoded),
            ", ".join(m.name for m in models),
            cut,
            exc_info=True,
        )
        answers = None
    if answers is None:  # each alone, so that one hostile frame cannot fail the others
        for i, frontier, dec in decoded:
            results[i] = _answer_alone(owners[i], cut, frames[i], frontier, dec, hop, device)
        return
    compute, cpu = time.perf_counter() - t0, time.thread_time() - c0
    batch_rows = sum(rows)
    for i, _, dec in decoded:
        stages = {"queue": hop, "decode": dec, "compute": compute}
        answer = _answer(frames[i], answers[i], stages, batch_rows, cpu)
        if isinstance(answer, Answer):
            answer.batch_models = len(models)
        results[i] = answer


def _shared_stop(models: Sequence[Bundle], cut: int) -> int:
    """The segment up to which every model's tail from ``cut`` runs the very same segments."""
    stop = cut
    first = models[0]
    while stop < first.n_segments and all(
        stop < m.n_segments and m.segments[stop] is not None and m.segments[stop] is first.segments[stop]
        for m in models
    ):
        stop += 1
    return stop


def _answer_alone(
    bundle: Bundle,
    cut: int,
    frame: Frame,
    frontier: list[torch.Tensor],
    dec: float,
    hop: float,
    device: torch.device,
) -> Answer | Problem:
    t0, c0 = time.perf_counter(), time.thread_time()
    try:
        outputs = _compute(bundle, cut, [frontier], device)
    except Exception:
        log.exception("the tail of %s at cut %d failed on request %s", bundle.name, cut, frame.request_id)
        return Problem("internal", "the tail failed on this request's tensors; see the server's log")
    stages = {"queue": hop, "decode": dec, "compute": time.perf_counter() - t0}
    return _answer(frame, list(outputs), stages, frame.rows, time.thread_time() - c0)


def _answer(
    frame: Frame,
    outputs: list[torch.Tensor],
    stages: dict[str, float],
    batch_rows: int,
    cpu: float,
) -> Answer | Problem:
    """Large outputs are encoded here, in the compute thread; small ones are left to the loop."""
    if frame.encoder is None or sum(o.numel() * o.element_size() for o in outputs) <= SMALL_BYTES:
        return Answer(None, {**stages, "encode": 0.0}, batch_rows, outputs, cpu)
    t0 = time.perf_counter()
    try:
        body = frame.encoder(outputs)
    except Exception:
        log.exception("encoding the outputs of request %s failed", frame.request_id)
        return Problem("internal", "the server failed to encode the outputs; see its log")
    return Answer(body, {**stages, "encode": time.perf_counter() - t0}, batch_rows, None, cpu)
