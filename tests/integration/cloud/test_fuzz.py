"""Property-based fuzzing (hypothesis) of the frame and codec decoders and of the HTTP endpoint.

Three targets, each fed structured hostile input built from real frames and blobs:

- the server's frame path in process: ``protocol.decode_request``, the checks against the
  bundle, and the payload decode (``decode_frame``); only the library's own errors may leave it;
- every codec's decoder on mutated, truncated, spliced and foreign blobs: ``CodecError`` or
  tensors within ``max_nbytes``, nothing else;
- a real ``splitinfer serve`` process over raw sockets: mutated frames, methods, paths, HTTP
  versions, headers (Content-Length, Transfer-Encoding, Expect, NUL and CR/LF in names and
  values), correct and broken framing. Every answer must be < 500 and problem+json when it is
  an error; the process must survive, stay clean (nothing in flight) and keep serving.

The suite runs a few hundred inputs; ``make fuzz`` runs 100,000 or more
(``SPLITINFER_FUZZ_EXAMPLES``), and ``make bench`` records the figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import socket
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisWarning

from splitinfer import protocol
from splitinfer.cloud._compute import decode_frame
from splitinfer.cloud._handlers import _check
from splitinfer.cloud._problem import Problem
from splitinfer.compression import get_codec
from splitinfer.compression._projection import fit
from splitinfer.errors import CodecError, ProtocolError
from splitinfer.tensors import DTYPES, specs_of
from tests.support.faults import LONG, ServeProcess, report, scale

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("SPLITINFER_FUZZ_EXAMPLES", scale(300, 100_000)))
#: Shares of the inputs: the in-process targets are cheap, the HTTP one costs a round trip.
SHARES = {"frames": 0.4, "codecs": 0.3, "http": 0.3}
STATS: dict[str, Counter[str]] = {name: Counter() for name in SHARES}


def _settings(target: str) -> settings:
    return settings(
        max_examples=max(1, int(EXAMPLES * SHARES[target])),
        deadline=None,
        database=None,
        derandomize=not LONG,  # the suite is reproducible; the long campaign explores
        suppress_health_check=list(HealthCheck),
    )


def _run(test: Callable[[], None]) -> None:
    """Run a @given test; a failing input too large to print whole must not hide the failure."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Generating overly large repr", HypothesisWarning)
        test()


def _record(target: str, seconds: float, **extra: object) -> None:
    stats = STATS[target]
    figures = {
        "inputs": stats["inputs"],
        "crashes": stats["crashes"],
        "seconds": round(seconds, 1),
        "outcomes": dict(sorted((k, v) for k, v in stats.items() if k not in ("inputs", "crashes"))),
        "fuzzer_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        **extra,
    }
    report("fuzz", {target: figures})


# -- hostile values ---------------------------------------------------------------------------

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.lists(st.integers(-5, 5), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
dims = st.one_of(
    st.integers(0, 64), st.integers(-(2**63), 2**64 - 1), st.sampled_from([1 << 31, 1 << 40, -1]), st.none()
)
tensor_entries = st.one_of(
    st.tuples(
        st.sampled_from([*DTYPES, "complex64", "", "float32\x00", "object"]), st.lists(dims, max_size=20)
    ).map(list),
    junk,
)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few byte flips, deletions, insertions, a truncation or a splice."""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate", "splice"]))
        i = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "flip" and out:
            out[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and out:
            out[i] = draw(st.sampled_from([0, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif op == "delete":
            del out[i : i + draw(st.integers(1, 64))]
        elif op == "insert":
            out[i:i] = draw(st.binary(min_size=1, max_size=64))
        elif op == "truncate":
            del out[i:]
        elif op == "splice":
            j = draw(st.integers(0, max(0, len(out) - 1)))
            out[i:i] = out[j : j + draw(st.integers(1, 256))]
    return bytes(out)


# -- the frame path ---------------------------------------------------------------------------

_PAYLOADS: dict[tuple[int, str], tuple[list[list[object]], bytes]] = {}


def _payload(bundle, cut: int, codec: str) -> tuple[list[list[object]], bytes]:
    """The wire tensors and an encoded real frontier of ``cut`` (a small batch), cached."""
    key = (cut, codec)
    if key not in _PAYLOADS:
        x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(cut))
        frontier = bundle.head(cut, x)
        wire = [[s.dtype, list(s.shape)] for s in specs_of(frontier)]
        _PAYLOADS[key] = (wire, get_codec(codec).encode(frontier))
    return _PAYLOADS[key]


FIELDS = ("v", "model", "graph", "cut", "codec", "tensors", "id", "deadline_s", "payload_nbytes")


@st.composite
def request_bodies(draw: st.DrawFn, bundle) -> bytes:
    """A request body: a real frame of some cut, its header fields and payload perturbed."""
    cut = draw(st.integers(0, bundle.last_cut))
    codec = draw(st.sampled_from(bundle.codecs))
    wire, payload = _payload(bundle, cut, codec)
    header: dict[object, object] = {
        "v": 1,
        "model": bundle.name,
        "graph": bundle.graph_hash,
        "cut": cut,
        "codec": codec,
        "tensors": wire,
        "id": "fuzz",
        "deadline_s": None,
        "payload_nbytes": len(payload),
    }
    for field in draw(st.sets(st.sampled_from(FIELDS), max_size=3)):
        choice = draw(st.sampled_from(["junk", "drop", "near"]))
        if choice == "drop":
            del header[field]
        elif choice == "near" and field == "tensors":
            header[field] = draw(st.lists(tensor_entries, max_size=4))
        elif choice == "near" and field in ("cut", "payload_nbytes", "v"):
            header[field] = draw(st.integers(-3, 3)) + (header[field] or 0)  # type: ignore[operator]
        elif choice == "near" and field == "codec":
            header[field] = draw(st.sampled_from(["f32", "q8+zstd1", "jpeg75", "zstd", "f32+zstd99", ""]))
        elif choice == "near" and field == "deadline_s":
            header[field] = draw(st.floats())
        else:
            header[field] = draw(junk)
    if draw(st.integers(0, 9)) == 0:
        header[draw(st.text(max_size=8))] = draw(junk)
    if draw(st.booleans()):
        payload = draw(mutated(payload))
    elif draw(st.integers(0, 5)) == 0:
        payload = draw(st.binary(max_size=512))
    try:
        head = msgpack.packb(header)
    except (OverflowError, ValueError, TypeError):
        head = msgpack.packb({"v": 1})
    body = head + payload
    if draw(st.integers(0, 4)) == 0:
        body = draw(mutated(body))
    return body


_EXPECTED = (ProtocolError, Problem)


def test_fuzz_the_frame_path(cnn_bundle):
    """decode_request, the bundle checks and the payload decode: only our errors, never a crash."""
    stats = STATS["frames"]
    t0 = time.perf_counter()

    @_settings("frames")
    @given(body=request_bodies(cnn_bundle))
    def run(body: bytes) -> None:
        stats["inputs"] += 1
        try:
            header, payload = protocol.decode_request(body, max_payload=1 << 20)
            _check(cnn_bundle, header, cnn_bundle.name, 1 << 22)
            frontier = decode_frame(header, payload)
        except _EXPECTED as exc:
            stats[getattr(exc, "code", "error")] += 1
            return
        except BaseException:
            stats["crashes"] += 1
            raise
        assert sum(t.numel() * t.element_size() for t in frontier) <= 1 << 22
        stats["decoded"] += 1

    _run(run)
    _record("frames", time.perf_counter() - t0)
    assert stats["crashes"] == 0
    assert stats["decoded"] > 0 and stats["malformed_frame"] > 0  # both sides were reached


# -- the codecs ----------------------------------------------------------------------------

SPECS = (
    "f32",
    "f16",
    "bf16",
    "q8",
    "q8c",
    "q4c+zstd1",
    "q2c+zstd1",
    "f32+zstd1",
    "q8+zstd1",
    "q5c+ans",
    "q3+ans",
    "jpeg75",
    "pca5q5+ans",
    "pca8q4+zstd1",
    "pca3q6",
)
#: The projection the pca codecs are bound to (8 channels, as the first samples below).
PROJECTION = fit([torch.randn(4, 8, 4, 4, generator=torch.Generator().manual_seed(7))])


def _codec(spec: str):
    return get_codec(spec, projection=PROJECTION) if spec.startswith("pca") else get_codec(spec)


def _blobs() -> dict[str, list[bytes]]:
    g = torch.Generator().manual_seed(0)
    samples = [
        [torch.randn(2, 8, 4, 4, generator=g)],
        [torch.rand(1, 3, 16, 16, generator=g), torch.randn(1, 5, generator=g)],
        [torch.relu(torch.randn(3, 4, 2, 2, generator=g)), torch.arange(6).reshape(2, 3)],
        [torch.zeros(4, 16, 8, 8)],  # compresses to almost nothing: a small bomb
        [torch.rand(2, 3, 16, 16, generator=g)],  # an image batch, for jpeg
    ]
    blobs: dict[str, list[bytes]] = {}
    for spec in SPECS:
        codec = _codec(spec)
        blobs[spec] = []
        for tensors in samples:
            try:
                blobs[spec].append(codec.encode(tensors))
            except CodecError:  # jpeg takes image batches only, pca one tensor of 8 channels
                continue
    return blobs


BLOBS = _blobs()


@st.composite
def codec_inputs(draw: st.DrawFn) -> tuple[str, bytes]:
    spec = draw(st.sampled_from(SPECS))
    source = draw(st.sampled_from(SPECS)) if draw(st.integers(0, 4)) == 0 else spec  # a foreign blob
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "random", "valid"]))
    if kind == "random":
        return spec, draw(st.binary(max_size=2048))
    blob = draw(st.sampled_from(BLOBS[source]))
    return spec, blob if kind == "valid" else draw(mutated(blob))


def test_fuzz_the_codec_decoders():
    stats = STATS["codecs"]
    limit = 1 << 20
    t0 = time.perf_counter()

    @_settings("codecs")
    @given(case=codec_inputs())
    def run(case: tuple[str, bytes]) -> None:
        spec, blob = case
        stats["inputs"] += 1
        try:
            tensors = _codec(spec).decode(blob, max_nbytes=limit)
        except CodecError:
            stats["refused"] += 1
            return
        except BaseException:
            stats["crashes"] += 1
            raise
        assert all(isinstance(t, torch.Tensor) for t in tensors)
        assert sum(t.numel() * t.element_size() for t in tensors) <= limit
        stats["decoded"] += 1

    _run(run)
    _record("codecs", time.perf_counter() - t0)
    assert stats["crashes"] == 0
    assert stats["decoded"] > 0 and stats["refused"] > 0


# -- the HTTP endpoint ---------------------------------------------------------------------

INFER = "/v1/models/democnn/infer"
METHODS = ["GET", "POST", "POST", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT"]
PATHS = [
    INFER,
    INFER,
    "/v1/models",
    "/v1/models/democnn",
    "/v1/models/nope/infer",
    "/v2/health/live",
    "/v2/health/ready",
    "/metrics",
    "/",
    "*",
    "/v1/models/../../etc/passwd",
    INFER + "?x=1&x=2",
    "/v1/models/%00/infer",
    "/v1/models/" + "a" * 300 + "/infer",
    "http://elsewhere/v1/models",
    "//v1//models",
]
VERSIONS = ["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTP/1.x", "http/1.1", "HTTP/1.1 x", ""]
CONTENT_TYPES = [
    protocol.FRAME_CONTENT_TYPE,
    "application/octet-stream",
    "application/msgpack; charset=utf-8",
    "text/plain",
    "multipart/form-data; boundary=x",
    "application/problem+json",
    ";;;",
]
HEADER_CHOICES: dict[str, list[str]] = {
    "Content-Type": CONTENT_TYPES,
    "Transfer-Encoding": ["chunked", "gzip", "identity", "chunked, gzip", "gzip, chunked", "x"],
    "Content-Encoding": ["gzip", "deflate", "br", "zstd", "identity", "x"],
    "Expect": ["100-continue", "200-ok", ""],
    "Connection": ["close", "keep-alive", "upgrade", "Upgrade, HTTP2-Settings", ""],
    "Upgrade": ["websocket", "h2c"],
    "Authorization": ["Bearer x", "Basic Zm9vOmJhcg==", "Bearer " + "a" * 5000, ""],
    "Content-Length": ["-1", "abc", "99999999999999999999", "1e3", "0x10", " 5", "5, 5", ""],
    "Host": ["", "x" * 300, "127.0.0.1:1", "[::1]"],
    "Range": ["bytes=0-1", "bytes=-1"],
    "Accept": ["text/html", "*/*", "application/json"],
}


@st.composite
def http_requests(draw: st.DrawFn, bundle) -> tuple[bytes, str, bool]:
    """Raw request bytes, the method, and whether the framing promises more than is sent.

    A quarter are well-formed inference requests whose frames only are hostile (so that the
    checks and the compute behind them are reached too); the rest vary everything.
    """
    if draw(st.integers(0, 3)) == 0:
        body = draw(request_bodies(bundle))
        head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        return head + body, "POST", False
    method = draw(st.one_of(st.sampled_from(METHODS), st.text(st.characters(codec="ascii"), max_size=10)))
    path = draw(
        st.one_of(
            st.sampled_from(PATHS),
            st.binary(max_size=40).map(lambda b: "/" + b.decode("latin-1")),
        )
    )
    version = draw(st.sampled_from(VERSIONS))
    kind = draw(st.sampled_from(["frame", "frame", "frame", "random", "empty"]))
    if kind == "frame":
        body = draw(request_bodies(bundle))
    elif kind == "random":
        body = draw(st.binary(max_size=4096))
    else:
        body = b""
    headers: list[tuple[bytes, bytes]] = [(b"Host", b"127.0.0.1")]
    if draw(st.booleans()):
        headers.append((b"Content-Type", protocol.FRAME_CONTENT_TYPE.encode()))
    for name in draw(st.lists(st.sampled_from(sorted(HEADER_CHOICES)), max_size=4)):
        headers.append((name.encode(), draw(st.sampled_from(HEADER_CHOICES[name])).encode("latin-1")))
    for _ in range(draw(st.integers(0, 2)) if draw(st.integers(0, 3)) == 0 else 0):
        headers.append((draw(st.binary(max_size=20)), draw(st.binary(max_size=40))))
    framing = draw(st.sampled_from(["length", "length", "length", "chunked", "none", "short", "long", "bad"]))
    if framing == "length":
        headers.append((b"Content-Length", str(len(body)).encode()))
    elif framing == "short":  # the rest of the body is read as the next request
        headers.append((b"Content-Length", str(max(0, len(body) - draw(st.integers(1, 40)))).encode()))
    elif framing == "long":  # promises more than it sends, then hangs up
        headers.append((b"Content-Length", str(len(body) + draw(st.integers(1, 1000))).encode()))
    elif framing in ("chunked", "bad"):
        headers.append((b"Transfer-Encoding", b"chunked"))
        chunks, i = [], 0
        while i < len(body):
            n = draw(st.integers(1, 2048))
            chunks.append(b"%x\r\n%s\r\n" % (n, body[i : i + n]) if framing == "chunked" else body[i : i + n])
            i += n
        body = b"".join(chunks) + (b"0\r\n\r\n" if framing == "chunked" else b"")
    head = f"{method} {path} {version}".encode("latin-1", "replace") + b"\r\n"
    head += b"".join(k + b": " + v + b"\r\n" for k, v in draw(st.permutations(headers)))
    return head + b"\r\n" + body, method, framing == "long"


def _exchange(
    port: int, request: bytes, method: str, hang_up: bool
) -> tuple[int | None, dict[str, str], bytes]:
    """Send ``request`` on a fresh connection; the first answer (status None: closed, no answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        with contextlib.suppress(OSError):  # the server refused the request part-way and closed
            s.sendall(request)
        if hang_up:
            return None, {}, b""
        data = b""
        while True:
            try:
                while b"\r\n\r\n" not in data:
                    chunk = s.recv(65536)
                    if not chunk:
                        return None, {}, b""
                    data += chunk
            except ConnectionError:
                return None, {}, b""
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            if status == 100:  # interim answer: the real one follows
                data = rest
                continue
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            length = 0 if method == "HEAD" else int(headers.get("content-length", "0"))
            try:
                while len(rest) < length:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    rest += chunk
            except ConnectionError:
                pass
            return status, headers, rest[:length]


def _metric(port: int, name: str) -> float:
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, _, body = _exchange(port, request, "GET", False)
    assert status == 200
    match = re.search(rf"^{name} ([0-9.e+-]+)$", body.decode(), re.MULTILINE)
    assert match, name
    return float(match.group(1))


@pytest.fixture(scope="module")
def fuzz_server(repository: Path):
    options = ("--max-body-bytes", str(1 << 18), "--read-timeout-s", "5", "--max-queue-length", "64")
    threads = ("--compute-threads", "1", "--torch-threads", "1")
    with ServeProcess(repository, *options, *threads) as server:
        yield server


def test_fuzz_the_http_endpoint(fuzz_server, cnn_bundle, cnn):
    stats = STATS["http"]
    port = fuzz_server.port
    t0 = time.perf_counter()

    @_settings("http")
    @given(case=http_requests(cnn_bundle))
    def run(case: tuple[bytes, str, bool]) -> None:
        request, method, hang_up = case
        stats["inputs"] += 1
        status, headers, body = _exchange(port, request, method, hang_up)
        if not fuzz_server.alive():
            stats["crashes"] += 1
            raise AssertionError(f"the server died: {''.join(fuzz_server.lines[-20:])}")
        if status is None:
            stats["hung up" if hang_up else "closed"] += 1
            return
        stats[f"{status // 100}xx"] += 1
        if status == 504 and json.loads(body)["code"] == "deadline_exceeded":
            stats["504 for a deadline that ran out while the body arrived"] += 1
            return  # the frame's own tiny deadline_s: a documented answer, not a server error
        assert status < 500, (status, body[:300], "".join(fuzz_server.lines)[-4000:])
        if status >= 400:
            assert headers.get("content-type", "").startswith(protocol.PROBLEM_CONTENT_TYPE), headers
            if method != "HEAD":
                doc = json.loads(body)
                assert doc["status"] == status and "Traceback" not in doc["detail"]
                stats[doc["code"]] += 1

    _run(run)
    # still alive, clean and serving, with nothing in its log but what it printed at start
    x = torch.rand(1, 3, 32, 32)
    body = protocol.encode_request(
        protocol.RequestHeader(
            model="democnn",
            graph=cnn_bundle.graph_hash,
            cut=4,
            codec="f32",
            tensors=specs_of(cnn_bundle.head(4, x)),
            request_id="after",
            payload_nbytes=len(get_codec("f32").encode(cnn_bundle.head(4, x))),
        ),
        get_codec("f32").encode(cnn_bundle.head(4, x)),
    )
    request = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    status, _, answer = _exchange(port, request, "POST", False)
    assert status == 200
    rheader, rpayload = protocol.decode_response(answer)
    with torch.no_grad():
        assert torch.allclose(get_codec(rheader.codec).decode(rpayload)[0], cnn(x), atol=1e-5)
    for _ in range(500):  # connections the fuzzer hung up on are cleaned up
        if _metric(port, "splitinfer_inflight_requests") == 0:
            break
        time.sleep(0.01)
    assert _metric(port, "splitinfer_inflight_requests") == 0
    assert _metric(port, "splitinfer_queue_depth") == 0
    assert fuzz_server.tracebacks() == [], "".join(fuzz_server.lines)[-6000:]
    _record("http", time.perf_counter() - t0, server_peak_rss_bytes=fuzz_server.peak_rss())
    assert stats["crashes"] == 0
    assert stats["5xx"] == stats["504 for a deadline that ran out while the body arrived"]
    assert stats["2xx"] > 0 and stats["4xx"] > 0
