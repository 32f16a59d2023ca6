"""What one request answers: one model (:class:`OneModel`), or several task models from one
upload (:class:`TaskSet`, ``EdgeClient(..., tasks=[...]).infer_many``). The request pipeline
(edge/_pipeline.py) serves both through the :class:`Target` protocol.

Several task models answered from one upload (``EdgeClient(..., tasks=[...]).infer_many``).

Models fine-tuned from one backbone compute the same head up to some cut ``s``: their segments
``0..s-1`` are equal (same graphs, weights and constants) and so are their frontiers there. A
client holding such models (its own bundle, then the tasks) computes the head once, sends its
frontier once, and the cloud runs every model's tail from it (the ``tasks`` of the wire's
request header, splitinfer/protocol.py); the answer carries every model's outputs.

The decision is priced for it (:func:`task_policy`): the client's own policy, over the cuts up to
``s`` (and all-on-device), with one upload, the head's shared part computed once on the cloud
(the server batches it once: cloud/_compute.py) and each model's own tail and answer added, and
on the device the head once plus every model's own rest. A lossy codec is a candidate only where
it meets the budget for every model. When the cloud cannot serve, every model's answer is
computed on the device from the frontier already computed.

Torch-free at import: segments are compared (:func:`shared_cut`) with torch only where they were
loaded on torch; on ONNX Runtime the models share cut 0 (the input) only.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from splitinfer import _pytree
from splitinfer.bundle import Bundle
from splitinfer.edge._config import ClientConfig
from splitinfer.errors import ConfigError, ProtocolError
from splitinfer.partitioner import Decision, Estimates, Policy
from splitinfer.partitioner._profiles import chain_times

if TYPE_CHECKING:
    from splitinfer.partitioner._costs import CostModel

__all__ = ["OneModel", "Target", "TaskSet", "make_tasks", "shared_cut", "task_policy"]

log = logging.getLogger("splitinfer.edge")

Flat = list[tuple[Any, ...]]


class Target(Protocol):
    """What a request answers, as the request pipeline needs it."""

    #: The first model: its head runs on the device and its frame is sent.
    bundle: Bundle
    #: The policy that decides the request (priced for every model answered).
    policy: Policy
    #: Whether the device can answer alone (every model whole).
    can_finish_locally: bool
    #: The other models the frame asks for, (name, graph hash) each.
    tasks: tuple[tuple[str, str], ...]
    #: Bytes of the answer the estimator expects (None: the first model's profile says).
    answer_bytes: float | None

    def stay_local(self) -> str | None:
        """Why requests stay on the device before trying the cloud, if they must."""
        ...

    def send_cut(self, decision: Decision) -> int | None:
        """The cut whose profiled tail prices the cloud's part for the estimator (None: not one
        model's tail, only the queue is learned from the answer)."""
        ...

    def profiled_head(self, k: int, inputs: Sequence[Any]) -> float | None:
        """The profile's seconds of the first model's head of cut ``k`` on these inputs."""
        ...

    def profiled_finish(
        self, k: int, frontier: Sequence[Any], decision: Decision, est: Estimates
    ) -> float | None:
        """The profile's seconds of finishing every model on the device from cut ``k``."""
        ...

    def profiled_all(self, inputs: Sequence[Any]) -> float | None:
        """The profile's seconds of every model on the device."""
        ...

    def run_all(self) -> tuple[int, Callable[[int, int, Sequence[Any]], Flat]]:
        """The last cut and the function ``(start, stop, frontier) -> every model's outputs``
        for running everything on the device."""
        ...

    def run_from(self, k: int, frontier: Sequence[Any]) -> Flat:
        """Every model's outputs (flat) from the first model's frontier at cut ``k``."""
        ...

    def split(self, outputs: tuple[Any, ...], models: tuple[tuple[str, int], ...]) -> Flat:
        """Every model's outputs from an answer's outputs and its models."""
        ...

    def refused(self) -> None:
        """The cloud said it cannot serve these models together."""
        ...

    def result(self, flat: Flat) -> Any:
        """What the caller gets: the model's outputs, or every model's by name."""
        ...


class HeadProfile:
    """The profiled batch-1 seconds of a bundle's heads, scaled by the inputs' rows."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        chain = chain_times(bundle)
        self._chain: list[float] | None = None if chain is None else chain[0]

    def head(self, k: int, inputs: Sequence[Any]) -> float | None:
        if self._chain is None:
            return None
        first: Any = inputs[0] if inputs else None  # a torch tensor or a numpy array
        rows = first.shape[0] if getattr(first, "ndim", 0) else 1
        return self._chain[k] * rows

    def rest(self, k: int, frontier: Sequence[Any]) -> float | None:
        """The profile's seconds of the device's tail from cut ``k`` (batch-1 time x rows)."""
        last, head = self.head(self.bundle.last_cut, frontier), self.head(k, frontier)
        return None if last is None or head is None else last - head


class OneModel:
    """One model's request (``EdgeClient.ainfer``)."""

    tasks: tuple[tuple[str, str], ...] = ()
    answer_bytes: float | None = None

    def __init__(self, bundle: Bundle, policy: Policy):
        self.bundle = bundle
        self.policy = policy
        self.can_finish_locally = bundle.can_head(bundle.last_cut)
        self.profile = HeadProfile(bundle)

    def stay_local(self) -> str | None:
        return None

    def send_cut(self, decision: Decision) -> int | None:
        return decision.cut

    def profiled_head(self, k: int, inputs: Sequence[Any]) -> float | None:
        return self.profile.head(k, inputs)

    def profiled_finish(
        self, k: int, frontier: Sequence[Any], decision: Decision, est: Estimates
    ) -> float | None:
        return self.profile.rest(k, frontier)

    def profiled_all(self, inputs: Sequence[Any]) -> float | None:
        return self.profile.head(self.bundle.last_cut, inputs)

    def run_all(self) -> tuple[int, Callable[[int, int, Sequence[Any]], Flat]]:
        return self.bundle.last_cut, lambda a, b, flat: [self.bundle.run_segments(a, b, flat)]

    def run_from(self, k: int, frontier: Sequence[Any]) -> Flat:
        return [self.bundle.run_segments(k, self.bundle.n_segments, frontier)]

    def split(self, outputs: tuple[Any, ...], models: tuple[tuple[str, int], ...]) -> Flat:
        return [outputs]

    def refused(self) -> None:
        pass

    def result(self, flat: Flat) -> Any:
        return _pytree.unflatten(list(flat[0]), self.bundle.out_spec)


@dataclass(eq=False)
class TaskSet:
    """The models one upload answers: the client's bundle first, then its tasks."""

    bundles: tuple[Bundle, ...]
    #: Every model computes the same head up to this cut (segments ``0..shared_cut-1``).
    shared_cut: int
    #: The client's policy, priced for one upload and every model's tail (:func:`task_policy`).
    policy: Policy
    #: Whether the device holds every model whole (it can answer them all when the cloud cannot).
    can_finish_locally: bool
    #: False once the cloud answered that it cannot serve them together: requests stay local.
    supported: bool = True

    def __post_init__(self) -> None:
        self.bundle = self.bundles[0]
        self.tasks = tuple((b.name, b.graph_hash) for b in self.bundles[1:])
        model = getattr(self.policy, "model", None)
        self.answer_bytes = getattr(model, "response_bytes", None)
        self.profile = HeadProfile(self.bundle)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bundles)

    def stay_local(self) -> str | None:
        return "tasks_refused" if not self.supported and self.can_finish_locally else None

    def send_cut(self, decision: Decision) -> int | None:
        # the answer's compute is several models' tails, which would read as a slow cloud
        # against the first model's profiled tail (the queue is still learned)
        return None

    def profiled_head(self, k: int, inputs: Sequence[Any]) -> float | None:
        return self.profile.head(k, inputs)

    def profiled_finish(
        self, k: int, frontier: Sequence[Any], decision: Decision, est: Estimates
    ) -> float | None:
        return decision.finish_s / est.device_slowdown if math.isfinite(decision.finish_s) else None

    def profiled_all(self, inputs: Sequence[Any]) -> float | None:
        """The profile's seconds of every model on the device (one head, every model's rest)."""
        model = getattr(self.policy, "model", None)
        if model is None:
            return None
        seconds = float(model.head[model.local])
        return seconds if math.isfinite(seconds) else None

    def run_all(self) -> tuple[int, Callable[[int, int, Sequence[Any]], Flat]]:
        return self.bundle.last_cut, lambda a, b, flat: self.run_from(a, flat)

    def run_from(self, k: int, frontier: Sequence[Any]) -> Flat:
        """Every model's outputs (flat) from the first model's frontier at cut ``k`` (at most
        ``shared_cut``): the shared part of the head once, then each model's own segments."""
        first, s = self.bundles[0], self.shared_cut
        shared = first.run_segments(k, s, frontier)
        return [b.run_segments(s, b.n_segments, shared) for b in self.bundles]

    def split(self, outputs: tuple[Any, ...], models: tuple[tuple[str, int], ...]) -> Flat:
        if [name for name, _ in models] != list(self.names):
            if not models:  # a server from before tasks answered the first model alone
                self.supported = False
            raise ProtocolError(
                f"the cloud answered models {[n for n, _ in models] or 'without naming them'} to a "
                f"request for {list(self.names)}; it may predate requests for several models"
            )
        flat, at = [], 0
        for _, count in models:
            flat.append(tuple(outputs[at : at + count]))
            at += count
        return flat

    def refused(self) -> None:
        self.supported = False  # the cloud's models differ from ours: it will refuse again

    def result(self, flat: Flat) -> Any:
        return {b.name: _pytree.unflatten(list(out), b.out_spec) for b, out in zip(self.bundles, flat)}


def make_tasks(
    bundle: Bundle,
    tasks: Sequence[str | os.PathLike[str] | Bundle],
    policy: Policy,
    config: ClientConfig,
    load: Callable[[str | os.PathLike[str] | Bundle], Bundle],
) -> TaskSet:
    """The task set of a client holding ``bundle`` with ``policy``; ConfigError if the tasks
    cannot share its uploads (other inputs, a repeated name)."""
    bundles = (bundle, *(load(t) for t in tasks))
    names = [b.name for b in bundles]
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks must be models other than the client's and each other's, got {names}")
    s = shared_cut(bundles)
    if s > 0:
        log.info("models %s share their head up to cut %d (%s)", ", ".join(names), s, bundle.cuts[s].name)
    can_finish = all(b.can_head(b.last_cut) for b in bundles)
    return TaskSet(bundles, s, task_policy(policy, bundles, s, config), can_finish)


def shared_cut(bundles: Sequence[Bundle]) -> int:
    """The deepest cut up to which every bundle computes what the first one does: equal
    segments (the same object, or equal graphs and tensors) and equal frontiers. ConfigError if
    they do not take the same inputs (then not even cut 0 is shared)."""
    first = bundles[0]
    for b in bundles[1:]:
        if b.inputs != first.inputs or b.in_spec != first.in_spec:
            raise ConfigError(
                f"model {b.name!r} takes {', '.join(map(str, b.inputs))} and model {first.name!r} takes "
                f"{', '.join(map(str, first.inputs))}: tasks answered from one upload take the same inputs"
            )
    digests: dict[int, str | None] = {}
    top = min(b.last_cut for b in bundles)
    k = 0
    while k < top and all(
        b.cuts[k + 1].tensors == first.cuts[k + 1].tensors and _same_segment(first, b, k, digests)
        for b in bundles[1:]
    ):
        k += 1
    return k


def _same_segment(a: Bundle, b: Bundle, i: int, digests: dict[int, str | None]) -> bool:
    sa, sb = a.segments[i], b.segments[i]
    if sa is None or sb is None:
        return False
    if sa is sb:
        return True
    for seg in (sa, sb):
        if id(seg) not in digests:
            digests[id(seg)] = segment_digest(seg)
    return digests[id(sa)] is not None and digests[id(sa)] == digests[id(sb)]


def segment_digest(segment: object) -> str | None:
    """A digest of a loaded torch segment's code and every tensor it reads (None for anything
    else): two segments with equal digests compute the same function."""
    import torch

    if not isinstance(segment, torch.fx.GraphModule):
        return None
    h = hashlib.sha256(segment.code.encode())
    for node in segment.graph.nodes:
        if node.op != "get_attr":
            continue
        value: Any = segment
        for part in str(node.target).split("."):
            value = getattr(value, part)
        if not isinstance(value, torch.Tensor):
            return None
        t = value.detach().cpu().contiguous()
        h.update(f"{node.target}:{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


# -- pricing -------------------------------------------------------------------------------


@runtime_checkable
class PricedPolicy(Protocol):
    """A policy over a cost model's rows that can be priced again (make_policy's policies)."""

    name: str
    model: CostModel

    def restricted(self, model: CostModel, keep: np.ndarray, why: Sequence[str], settings: str) -> Policy: ...


def task_policy(policy: Policy, bundles: Sequence[Bundle], s: int, config: ClientConfig) -> Policy:
    """``policy`` over the candidates of one upload for every model.

    make_policy's policies are priced again (``CostModel.for_tasks``): the first model's head
    and encode on the device, one upload, on the cloud its tail plus every other model's own
    tail from ``s``, every model's answer; on the device (all local, or finishing a hedged
    request) the first model's rest plus every other model's segments from ``s``. A row stays
    allowed if ``policy`` allows it, its cut is at most ``s`` (or it is all-on-device), and a
    lossy codec meets the budget for every model. Any other Policy decides as it is; a decision
    of it beyond ``s`` is refused when made (the pipeline's ConfigError).
    """
    if not isinstance(policy, PricedPolicy):
        return policy
    model = policy.model.for_tasks(bundles[1:], s)
    budget = config.fidelity_budget if policy.name in ("adaptive", "cloud") else 0.0
    why = model.exclusions(budget, None)
    for i in range(len(model)):
        if not why[i] and model.sent[i] and model.cut[i] > s:
            why[i] = f"the tasks' heads differ here (shared up to cut {s})"
    keep = np.array([not r for r in why])
    return policy.restricted(
        model, keep, why, f"{len(bundles)} models from one upload, heads shared up to cut {s}"
    )
