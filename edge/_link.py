"""The link as the estimator sees it: sends measured while in flight, the cloud's Retry-After,
and link probes when the estimates are stale."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from splitinfer import protocol
from splitinfer.edge._cloud_api import CloudAPI, error_of
from splitinfer.edge._observe import Observer
from splitinfer.edge._transport import TransportResponse
from splitinfer.errors import CloudError, ProtocolError
from splitinfer.partitioner import Estimator

__all__ = ["PROBE_TIMEOUT_S", "Link", "LinkProber"]

log = logging.getLogger("splitinfer.edge")

#: Seconds a link probe may take before it counts as failed.
PROBE_TIMEOUT_S = 10.0


class Link:
    """Sends through the cloud API while the estimator counts them in flight; holds the time
    before which the cloud asked to be left alone."""

    def __init__(self, api: CloudAPI, estimator: Estimator, clock: Callable[[], float] = time.monotonic):
        self.api = api
        self.estimator = estimator
        self.clock = clock
        #: Requests (and probe uploads) of this client on the link now.
        self.sending = 0
        #: clock() before which the cloud asked not to be sent requests (Retry-After).
        self.back_at = 0.0

    def backing_off(self) -> bool:
        return self.clock() < self.back_at

    def back_off(self, seconds: float) -> None:
        self.back_at = max(self.back_at, self.clock() + seconds)

    async def send(
        self,
        body: bytes,
        timeout_s: float | None,
        *,
        model: str | None = None,
        cut: int | None,
        answer_bytes: float | None = None,
    ) -> TransportResponse:
        """POST ``body`` (a frame for ``model``, else a link probe), in flight for the
        estimator until it ends; a 2xx answer feeds it. ``cut`` and ``answer_bytes`` (default:
        the profile's response size) say how long the cloud and the answer should take."""
        est = self.estimator
        transfer = est.start_transfer(len(body), time.perf_counter(), cut=cut, down_bytes=answer_bytes)
        self.sending += 1
        try:
            if model is not None:
                resp = await self.api.post_frame(model, body, timeout_s)
            else:
                resp = await self.api.post_probe(body, PROBE_TIMEOUT_S if timeout_s is None else timeout_s)
        except BaseException:
            est.cancel_transfer(transfer)
            raise
        finally:
            self.sending -= 1
        if resp.status // 100 != 2:
            est.cancel_transfer(transfer)
            return resp
        est.observe_transfer(
            up_bytes=len(body),
            down_bytes=len(resp.body),
            start=resp.started,
            first_byte=resp.first_byte,
            end=resp.ended,
            server_timing=resp.headers.get("Server-Timing"),
            cut=cut,
            transfer_id=transfer,
        )
        return resp


class LinkProber:
    """Measures the link in the background when the estimates are stale (EdgeClient's docstring
    says when); at most one probe at a time, none while the cloud asked to be left alone."""

    def __init__(self, link: Link, observer: Observer, enabled: bool):
        self.link = link
        self.observer = observer
        self.enabled = enabled
        self._task: asyncio.Task[None] | None = None

    def maybe_probe(self, *, sending: bool) -> None:
        """Start a probe if the estimates are stale: the round trip only while no request is on
        the link (it would queue behind the upload), the uplink only when the request at hand
        stays on the device (one that is sent measures it)."""
        if not self.enabled or (self._task is not None and not self._task.done()):
            return
        if self.link.backing_off():
            return
        est = self.link.estimator
        rtt = self.link.sending == 0 and est.needs_rtt_probe()
        upload = not sending and est.needs_probe()
        if rtt or upload:
            self._task = asyncio.ensure_future(self.probe(rtt=rtt, upload=upload))

    async def probe(self, *, rtt: bool, upload: bool) -> None:
        """An empty probe for the round trip, then an upload of ``probe_bytes()``; never raises."""
        if rtt and not await self.probe_part("rtt", b""):
            return
        if upload:
            await self.probe_part("upload", bytes(self.link.estimator.probe_bytes()))

    async def probe_part(self, part: str, body: bytes) -> bool:
        """One probe request, its measurement given to the estimator; whether it was answered."""
        try:
            if body:
                resp = await self.link.send(body, PROBE_TIMEOUT_S, cut=None, answer_bytes=0)
            else:
                resp = await self.link.api.post_probe(body, PROBE_TIMEOUT_S)
                if resp.status == 204:
                    server = sum(protocol.parse_server_timing(resp.headers.get("Server-Timing")).values())
                    self.link.estimator.observe_rtt(max(0.0, resp.first_byte - resp.started - server))
            ok = resp.status == 204
            if resp.status in (401, 403, 409):
                self.observer.refused(resp.status, f"link probe ({part})", error_of(resp))
            if resp.status in (404, 405):
                self.enabled = False  # a server from before link probes: do not ask again
                log.warning("the cloud does not answer link probes (HTTP %s); probing stops", resp.status)
        except (CloudError, ProtocolError) as exc:
            log.debug("link probe (%s) failed: %s", part, exc)
            ok = False
        self.observer.probe(part, ok)
        return ok

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
