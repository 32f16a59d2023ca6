"""EdgeClient: run the head on the device, send the frontier, get the outputs back."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from torch.utils import _pytree as pytree

from splitinfer import protocol
from splitinfer.bundle import Bundle
from splitinfer.compression import get_codec
from splitinfer.edge._transport import HttpTransport, Transport
from splitinfer.errors import ConfigError, ProtocolError, RemoteRequestError
from splitinfer.tensors import specs_of

__all__ = ["EdgeClient", "Trace"]

T = TypeVar("T")


@dataclass(frozen=True)
class Trace:
    """What happened to one request."""

    request_id: str
    cut: int
    codec: str
    bytes_up: int
    bytes_down: int
    #: Measured seconds per stage on the edge (head, encode, network, decode) and, from the
    #: Server-Timing header, on the cloud (prefixed ``cloud_``).
    stages: dict[str, float] = field(default_factory=dict)
    fallback: str | None = None


class EdgeClient:
    """The edge SDK. Use it as a context manager, sync (``infer``) or async (``ainfer``).

    This version sends every request at one fixed ``cut`` with one ``codec``.
    """

    def __init__(
        self,
        url: str,
        *,
        bundle: str | os.PathLike[str] | Bundle,
        cut: int = 1,
        codec: str = "f32+zstd1",
        token: str | None = None,
        deadline_s: float | None = 10.0,
        transport: Transport | None = None,
    ):
        if isinstance(bundle, Bundle):
            self.bundle = bundle
        else:
            self.bundle = Bundle.load(Path(bundle), upto_cut=cut)
        self.bundle.cut(cut)
        if not self.bundle.can_head(cut):
            raise ConfigError(f"the bundle given holds no head for cut {cut}; load it with upto_cut >= {cut}")
        if codec not in self.bundle.codecs:
            raise ConfigError(
                f"bundle {self.bundle.name!r} offers codecs {self.bundle.codecs}, not {codec!r}"
            )
        if deadline_s is not None and deadline_s <= 0:
            raise ConfigError(f"deadline_s must be positive or None, got {deadline_s}")
        self.cut = cut
        self.codec = self.bundle.codec_for(cut, codec)
        self.deadline_s = deadline_s
        self.transport: Transport = transport or HttpTransport(url, token=token)
        self.last_trace: Trace | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- async API -----------------------------------------------------------------------

    async def ainfer(self, *inputs: Any) -> Any:
        """The model's outputs for ``inputs``, computed across the device and the cloud."""
        request_id = uuid.uuid4().hex
        stages: dict[str, float] = {}
        t0 = time.perf_counter()
        frontier = await asyncio.to_thread(self.bundle.head, self.cut, *inputs)
        t1 = time.perf_counter()
        payload = await asyncio.to_thread(self.codec.encode, frontier)
        t2 = time.perf_counter()
        header = protocol.RequestHeader(
            model=self.bundle.name,
            graph=self.bundle.graph_hash,
            cut=self.cut,
            codec=self.codec.spec,
            tensors=specs_of(frontier),
            request_id=request_id,
            payload_nbytes=len(payload),
            deadline_s=self.deadline_s,
        )
        body = protocol.encode_request(header, payload)
        resp = await self.transport.post(
            f"/v1/models/{self.bundle.name}/infer",
            body,
            {"Content-Type": protocol.FRAME_CONTENT_TYPE},
            self.deadline_s,
        )
        t3 = time.perf_counter()
        if resp.status != 200:
            raise protocol.error_from_problem(resp.status, resp.body, resp.headers.get("Retry-After"))
        try:
            rheader, rpayload = protocol.decode_response(resp.body)
        except ProtocolError as exc:
            raise RemoteRequestError(f"the cloud sent a malformed answer: {exc}") from exc
        outputs = get_codec(rheader.codec).decode(
            rpayload, max_nbytes=sum(s.nbytes() for s in rheader.tensors)
        )
        t4 = time.perf_counter()
        stages.update(head=t1 - t0, encode=t2 - t1, network=t3 - t2, decode=t4 - t3)
        cloud = protocol.parse_server_timing(resp.headers.get("Server-Timing"))
        stages.update({f"cloud_{k}": v for k, v in cloud.items()})
        self.last_trace = Trace(request_id, self.cut, self.codec.spec, len(body), len(resp.body), stages)
        return pytree.tree_unflatten(list(outputs), pytree.treespec_loads(self.bundle.out_spec))

    async def aclose(self) -> None:
        await self.transport.close()

    async def __aenter__(self) -> EdgeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- sync API: a private event loop in a daemon thread -------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="splitinfer-edge", daemon=True
                )
                self._thread.start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def infer(self, *inputs: Any) -> Any:
        """Synchronous :meth:`ainfer`; safe to call from several threads."""
        return self._run(self.ainfer(*inputs))

    def close(self) -> None:
        if self._loop is None:
            return
        self._run(self.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
