"""A trained bottleneck codec over a real socket: the edge's encoder, the server's decoder and
tail (docs/learning.md); a blob of another bottleneck is a 400 naming both."""

from __future__ import annotations

import aiohttp
import pytest
import torch

import splitinfer as si
from splitinfer import protocol
from splitinfer.compression import TrainedBottleneck, get_codec
from splitinfer.tensors import specs_of
from tests.support.cloud import outputs, post, problem_code, running
from tests.support.zoo import TinyClassifier
from tests.support.zoo import seeded_rows as _rows

SPEC = "bn4q2+zstd1"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = TinyClassifier().eval()
    probe = si.compile(model, (torch.randn(1, 3, 8, 8),), name="tiny", runtimes=("torch",))
    k = next(c.index for c in probe.cuts if len(c.tensors) == 1 and c.tensors[0].shape[1:] == (16, 4, 4))
    bundle = si.compile(
        model,
        (torch.randn(1, 3, 8, 8),),
        name="tiny",
        runtimes=("torch",),
        training=_rows(32, 1),
        bottleneck_cuts=[k],
        exits=[],
        calibration=_rows(8, 2),
        codecs=["f32", SPEC],
        train_steps=5,
    )
    root = tmp_path_factory.mktemp("repo")
    bundle.save(root / "tiny")
    return root, k


def _body(edge: si.Bundle, k: int, frontier, payload: bytes) -> bytes:
    header = protocol.RequestHeader(
        model=edge.name,
        graph=edge.graph_hash,
        cut=k,
        codec=SPEC,
        tensors=specs_of(frontier),
        request_id="bn",
        payload_nbytes=len(payload),
    )
    return protocol.encode_request(header, payload)


async def test_the_server_decodes_the_edges_codes_and_runs_the_tail(served):
    root, k = served
    edge = si.Bundle.load(root / "tiny", upto_cut=k)
    x = torch.randn(2, 3, 8, 8)
    frontier = edge.head(k, x)
    payload = edge.codec_for(k, SPEC).encode(list(frontier))
    local = si.Bundle.load(root / "tiny")
    want = local.tail(k, local.decoder_for(k, SPEC).decode(payload))
    mine = edge.bottleneck_at(k, SPEC)
    assert mine is not None
    foreign = TrainedBottleneck("ffffffff", mine.frontier, mine.code, mine.bits, mine.encoder)
    async with running(root) as server, aiohttp.ClientSession() as session:
        url = f"{server.url}/v1/models/tiny/infer"
        status, _, body = await post(session, url, _body(edge, k, frontier, payload))
        assert status == 200, body[:300]
        (got,) = outputs(body)
        assert torch.allclose(got, want, atol=1e-5)
        hostile = get_codec(SPEC, bottleneck=foreign).encode(list(frontier))
        status, headers, body = await post(session, url, _body(edge, k, frontier, hostile))
        assert status == 400 and problem_code(status, headers, body) == "malformed_frame"
        assert b"ffffffff" in body and mine.id.encode() in body
