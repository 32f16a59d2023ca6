"""Wire protocol v1: round trips, and every way a frame can be wrong."""

import json

import msgpack
import pytest

from splitinfer import errors, protocol
from splitinfer.tensors import TensorSpec


def _request(**overrides):
    fields = dict(
        model="democnn",
        graph="abc123",
        cut=3,
        codec="f32+zstd1",
        tensors=(TensorSpec((2, 16, 8, 8), "float32"),),
        request_id="r1",
        payload_nbytes=5,
        deadline_s=0.5,
    )
    fields.update(overrides)
    return protocol.RequestHeader(**fields)


def _raw_body(header_map, payload=b"hello"):
    return msgpack.packb(header_map) + payload


def _valid_map(**overrides):
    m = {
        "v": 1,
        "model": "democnn",
        "graph": "abc",
        "cut": 1,
        "codec": "f32",
        "tensors": [["float32", [1, 4]]],
        "id": "x",
        "deadline_s": None,
        "payload_nbytes": 5,
    }
    m.update(overrides)
    return m


def test_request_round_trip():
    header = _request()
    body = protocol.encode_request(header, b"hello")
    decoded, payload = protocol.decode_request(body)
    assert decoded == header
    assert bytes(payload) == b"hello"


def test_response_round_trip():
    header = protocol.ResponseHeader("r1", "f32", (TensorSpec((1, 10), "float32"),), 3)
    decoded, payload = protocol.decode_response(protocol.encode_response(header, b"abc"))
    assert decoded == header
    assert bytes(payload) == b"abc"


def test_a_request_for_several_models_round_trips_and_old_frames_are_unchanged():
    header = _request(tasks=(("dogs", "d0g5"), ("birds", "b1rd")))
    decoded, _ = protocol.decode_request(protocol.encode_request(header, b"hello"))
    assert decoded == header
    # a frame without tasks carries no such field: what old clients send, and old servers read
    plain = protocol.encode_request(_request(), b"hello")
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(plain)
    assert set(unpacker.unpack()) == set(_valid_map())
    assert protocol.decode_request(_raw_body(_valid_map()))[0].tasks == ()
    response = protocol.ResponseHeader("r1", "f32", (TensorSpec((1, 5), "float32"),), 3)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(protocol.encode_response(response, b"abc"))
    assert "models" not in unpacker.unpack()


def test_a_response_for_several_models_says_whose_tensors_are_whose():
    specs = (TensorSpec((1, 5), "float32"), TensorSpec((1, 7), "float32"), TensorSpec((1,), "int64"))
    header = protocol.ResponseHeader("r1", "f32", specs, 3, models=(("cats", 1), ("dogs", 2)))
    decoded, _ = protocol.decode_response(protocol.encode_response(header, b"abc"))
    assert decoded == header
    bad = msgpack.packb(
        {
            "v": 1,
            "id": "r1",
            "codec": "f32",
            "tensors": [["float32", [1]]],
            "payload_nbytes": 0,
            "models": [["a", 2]],
        }
    )
    with pytest.raises(errors.ProtocolError, match="accounts for 2 tensors"):
        protocol.decode_response(bad)


@pytest.mark.parametrize(
    "tasks",
    [
        "dogs",
        [["dogs"]],
        [["dogs", 5]],
        [["../dogs", "g"]],
        [["dogs", "g"], ["dogs", "h"]],
        [["democnn", "g"]],
        [[f"m{i}", "g"] for i in range(protocol.MAX_TASKS + 1)],
    ],
)
def test_malformed_tasks_are_protocol_errors(tasks):
    with pytest.raises(errors.ProtocolError):
        protocol.decode_request(_raw_body(_valid_map(tasks=tasks)))


def test_encode_refuses_a_payload_that_disagrees_with_its_header():
    with pytest.raises(errors.ConfigError, match="payload bytes"):
        protocol.encode_request(_request(payload_nbytes=4), b"hello")


@pytest.mark.parametrize("cut", [1, 5, 20, 40])
def test_truncated_frames_are_protocol_errors(cut):
    body = protocol.encode_request(_request(), b"hello")
    with pytest.raises(errors.ProtocolError, match="truncated"):
        protocol.decode_request(body[: len(body) - cut])


def test_padded_frame_is_refused():
    body = protocol.encode_request(_request(), b"hello")
    with pytest.raises(errors.ProtocolError, match="declares 5 payload bytes, 6 follow"):
        protocol.decode_request(body + b"!")


def test_empty_body():
    with pytest.raises(errors.ProtocolError, match="empty body"):
        protocol.decode_request(b"")


def test_wrong_version_is_its_own_error():
    with pytest.raises(errors.UnsupportedVersionError, match="version 2"):
        protocol.decode_request(_raw_body(_valid_map(v=2)))


def test_oversized_payload_declared_is_refused_before_anything_else():
    body = _raw_body(_valid_map(payload_nbytes=10**12))
    with pytest.raises(errors.FrameTooLargeError):
        protocol.decode_request(body, max_payload=1 << 20)


def test_oversized_header_is_refused():
    body = _raw_body(_valid_map(id="x" * 200_000))
    with pytest.raises((errors.FrameTooLargeError, errors.ProtocolError)):
        protocol.decode_request(body)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cut", "3"),
        ("cut", -1),
        ("cut", True),
        ("model", 5),
        ("model", "../etc"),
        ("graph", None),
        ("codec", ["f32"]),
        ("tensors", "float32"),
        ("tensors", [["float32"]]),
        ("tensors", [["complex64", [1]]]),
        ("tensors", [["float32", [-1, 4]]]),
        ("tensors", [["float32", [None, 4]]]),
        ("deadline_s", "soon"),
        ("payload_nbytes", "5"),
        ("id", 7),
    ],
)
def test_wrongly_typed_fields_are_protocol_errors(field, value):
    with pytest.raises(errors.ProtocolError):
        protocol.decode_request(_raw_body(_valid_map(**{field: value})))


def test_missing_field_is_named():
    m = _valid_map()
    del m["graph"]
    with pytest.raises(errors.ProtocolError, match="'graph'"):
        protocol.decode_request(_raw_body(m))


@pytest.mark.parametrize("body", [b"\xc1", b"\x93\x01\x02\x03", b"not msgpack at all", b"\xff" * 100])
def test_garbage_is_a_protocol_error(body):
    with pytest.raises(errors.ProtocolError):
        protocol.decode_request(body)


def test_problem_body_is_rfc9457_with_a_stable_code():
    status, body = protocol.problem_body("graph_mismatch", "reload the bundle")
    doc = json.loads(body)
    assert status == 409
    assert doc["status"] == 409
    assert doc["code"] == "graph_mismatch"
    assert doc["detail"] == "reload the bundle"
    assert doc["type"].endswith("graph_mismatch")


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        ("unauthorized", errors.AuthError),
        ("forbidden", errors.AuthError),
        ("graph_mismatch", errors.GraphMismatchError),
        ("overloaded", errors.CloudUnavailableError),
        ("deadline_exceeded", errors.CloudTimeoutError),
        ("bad_codec", errors.RemoteRequestError),
        ("malformed_frame", errors.RemoteRequestError),
        ("internal", errors.CloudUnavailableError),
    ],
)
def test_problems_map_back_to_the_error_tree(code, error_type):
    status, body = protocol.problem_body(code, "details")
    exc = protocol.error_from_problem(status, body, retry_after="3")
    assert isinstance(exc, error_type)
    assert exc.code == code
    assert exc.status == status
    assert "details" in str(exc)


def test_problem_that_is_not_json_still_maps():
    exc = protocol.error_from_problem(502, b"<html>bad gateway</html>")
    assert isinstance(exc, errors.CloudUnavailableError)
    assert exc.code is None
    assert "bad gateway" in str(exc)


def test_server_timing_parses_durations_in_seconds():
    stages = protocol.parse_server_timing("queue;dur=1.5, compute;dur=20;desc=x, bad;dur=zz, total")
    assert stages == {"queue": 0.0015, "compute": 0.02}
    assert protocol.parse_server_timing(None) == {}
