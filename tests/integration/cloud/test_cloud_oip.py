"""The Open Inference Protocol (KServe v2) on /v2, spoken by Triton's own client (tritonclient[http])."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import torch
from tritonclient.http import InferInput, InferRequestedOutput
from tritonclient.http.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

import splitinfer as si
from splitinfer._version import __version__
from tests.support.cloud import INFER, post, problem_code, running


def _client(url: str) -> InferenceServerClient:
    return InferenceServerClient(url.removeprefix("http://"))


def _input(name: str, array: np.ndarray, datatype: str = "FP32", *, binary: bool = True) -> InferInput:
    tensor = InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


async def test_server_and_model_metadata(repository, cnn_bundle):
    async with running(repository) as server:
        client = _client(server.url)
        try:
            assert await client.is_server_live()
            assert await client.is_server_ready()
            assert await client.is_model_ready("democnn")
            assert await client.is_model_ready("democnn", model_version=cnn_bundle.version)
            assert not await client.is_model_ready("nosuchmodel")
            meta = await client.get_server_metadata()
            assert meta["name"] == "splitinfer" and meta["version"] == __version__
            assert "binary_tensor_data" in meta["extensions"]
            model = await client.get_model_metadata("democnn")
            assert model["name"] == "democnn" and model["versions"] == [cnn_bundle.version]
            assert model["inputs"] == [{"name": "input_0", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
            assert model["outputs"] == [{"name": "output_0", "datatype": "FP32", "shape": [-1, 10]}]
            cuts = model["parameters"]["cuts"]
            assert [c["cut"] for c in cuts] == list(range(cnn_bundle.last_cut))
            for c in cuts:
                specs = cnn_bundle.cuts[c["cut"]].tensors
                assert [i["name"] for i in c["inputs"]] == cnn_bundle.tensor_names(c["cut"])
                assert [i["shape"][1:] for i in c["inputs"]] == [list(s.shape[1:]) for s in specs]
            again = await client.get_model_metadata("democnn", model_version=cnn_bundle.version)
            assert again == model
            with pytest.raises(InferenceServerException, match="no model 'nosuchmodel'") as err:
                await client.get_model_metadata("nosuchmodel")
            assert err.value.status() == "404"
            with pytest.raises(InferenceServerException, match="version") as err:
                await client.get_model_metadata("democnn", model_version="7")
            assert err.value.status() == "404"
        finally:
            await client.close()


async def test_infer_with_binary_tensors_and_with_json_equals_the_model(repository, cnn):
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        want = cnn(x).numpy()
    async with running(repository) as server:
        client = _client(server.url)
        try:
            # tritonclient's defaults: binary inputs, binary outputs
            result = await client.infer("democnn", [_input("input_0", x.numpy())], request_id="r1")
            np.testing.assert_allclose(result.as_numpy("output_0"), want, rtol=1e-4, atol=1e-5)
            assert result.get_response()["id"] == "r1"
            assert result.get_output("output_0")["parameters"]["binary_data_size"] == want.nbytes
            # JSON only, both ways
            result = await client.infer(
                "democnn",
                [_input("input_0", x.numpy(), binary=False)],
                outputs=[InferRequestedOutput("output_0", binary_data=False)],
            )
            response = result.get_response()
            assert response["model_name"] == "democnn"
            assert "parameters" not in response["outputs"][0]
            np.testing.assert_allclose(result.as_numpy("output_0"), want, rtol=1e-4, atol=1e-5)
        finally:
            await client.close()
        ok = server.registry.get_sample_value("splitinfer_requests_total", {"model": "democnn", "code": "ok"})
        assert ok == 2.0
        count = server.registry.get_sample_value(
            "splitinfer_request_payload_bytes_count", {"model": "democnn", "cut": "0", "codec": "oip"}
        )
        assert count == 2.0


async def test_infer_a_tail_from_a_cut(repository, cnn_bundle, cnn):
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = cnn(x).numpy()
    async with running(repository) as server:
        client = _client(server.url)
        try:
            for cut in range(1, cnn_bundle.last_cut):
                frontier = cnn_bundle.head(cut, x)
                names = cnn_bundle.tensor_names(cut)
                inputs = [_input(n, t.numpy()) for n, t in zip(names, frontier)]
                result = await client.infer("democnn", inputs, parameters={"cut": cut})
                np.testing.assert_allclose(result.as_numpy("output_0"), want, rtol=1e-4, atol=1e-5)
            with pytest.raises(InferenceServerException, match="takes the inputs cut1_0") as err:
                await client.infer("democnn", [_input("input_0", x.numpy())], parameters={"cut": 1})
            assert err.value.status() == "400"
            with pytest.raises(InferenceServerException, match="'cut' must be an integer") as err:
                await client.infer("democnn", [_input("input_0", x.numpy())], parameters={"cut": 99})
            assert err.value.status() == "400"
        finally:
            await client.close()


async def test_malformed_requests_get_a_protocol_error_and_the_server_keeps_serving(repository, cnn):
    x = np.random.rand(1, 3, 32, 32).astype(np.float32)
    async with running(repository) as server:
        client = _client(server.url)
        try:
            with pytest.raises(InferenceServerException, match="must have shape") as err:
                await client.infer("democnn", [_input("input_0", x[:, :, :16])])
            assert err.value.status() == "400"
            with pytest.raises(InferenceServerException, match="must be FP32") as err:
                await client.infer("democnn", [_input("input_0", x.astype(np.float16), "FP16")])
            assert err.value.status() == "400"
            with pytest.raises(InferenceServerException, match="no model") as err:
                await client.infer("nosuchmodel", [_input("input_0", x)])
            assert err.value.status() == "404"
        finally:
            await client.close()
        url = server.url + "/v2/models/democnn/infer"
        one = {"name": "input_0", "shape": [1, 3, 32, 32], "datatype": "FP32"}
        cases = [
            (b"{not json", {}, "not valid JSON"),
            (b"[1, 2]", {}, "must be a JSON object"),
            (json.dumps({"inputs": [{**one, "data": [1.0, 2.0]}]}).encode(), {}, "3072 values; got 2"),
            (json.dumps({"inputs": [{**one, "data": ["a"] * 3072}]}).encode(), {}, "must hold numbers"),
            (json.dumps({"inputs": [one]}).encode(), {}, "neither 'data' nor"),
            (json.dumps({"inputs": [{**one, "shape": [1, -3]}]}).encode(), {}, "non-negative integers"),
            (json.dumps({"inputs": [], "parameters": {"cutt": 1}}).encode(), {}, "unknown request parameter"),
        ]
        binary = json.dumps({"inputs": [{**one, "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        cases += [
            (binary + x.tobytes()[:-4], {"Inference-Header-Content-Length": str(len(binary))}, "ends before"),
            (binary + x.tobytes() + b"xx", {"Inference-Header-Content-Length": str(len(binary))}, "2 bytes"),
            (binary + x.tobytes(), {"Inference-Header-Content-Length": "99999999"}, "but the body has"),
        ]
        async with aiohttp.ClientSession() as s:
            for body, headers, message in cases:
                async with s.post(url, data=body, headers=headers) as r:
                    assert r.status == 400, (message, await r.text())
                    assert r.content_type == "application/json"
                    doc = await r.json()
                    assert list(doc) == ["error"] and message in doc["error"], (message, doc)
            async with s.get(server.url + "/v2/models/democnn/nothing") as r:
                assert r.status == 404 and "error" in await r.json()
            # /v1 still answers problem+json, and the server still serves both
            status, headers, answer = await post(s, server.url + INFER, b"junk")
            assert problem_code(status, headers, answer) == "malformed_frame"
            doc = {"inputs": [{**one, "parameters": {"binary_data_size": x.nbytes}}]}
            good = json.dumps({**doc, "parameters": {"binary_data_output": True}}).encode()
            length = {"Inference-Header-Content-Length": str(len(good))}
            async with s.post(url, data=good + x.tobytes(), headers=length) as r:
                assert r.status == 200
                n = int(r.headers["Inference-Header-Content-Length"])
                raw = await r.read()
                out = np.frombuffer(raw[n:], dtype=np.float32)
        with torch.no_grad():
            np.testing.assert_allclose(out, cnn(torch.from_numpy(x)).numpy().ravel(), rtol=1e-4, atol=1e-5)
        bad = server.registry.get_sample_value(
            "splitinfer_requests_total", {"model": "democnn", "code": "bad_request"}
        )
        assert bad == len(cases) + 2


async def test_v2_shares_the_limits_and_tokens_of_v1(repository, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("a-long-enough-token-for-the-v2-test\n")
    x = np.random.rand(64, 3, 32, 32).astype(np.float32)
    async with running(repository, token_file=tokens, max_body_bytes=64 * 1024) as server:
        client = _client(server.url)
        try:
            with pytest.raises(InferenceServerException) as err:
                await client.infer("democnn", [_input("input_0", x[:1])])
            assert err.value.status() == "401"
            auth = {"Authorization": "Bearer a-long-enough-token-for-the-v2-test"}
            result = await client.infer("democnn", [_input("input_0", x[:1])], headers=auth)
            assert result.as_numpy("output_0").shape == (1, 10)
            with pytest.raises(InferenceServerException) as err:
                await client.infer("democnn", [_input("input_0", x)], headers=auth)
            assert err.value.status() == "413"
        finally:
            await client.close()


class _Typed(torch.nn.Module):
    """A model with an input of every integer, bool and float type the protocol carries."""

    def forward(self, h, b, i8, u8, i16, i32, i64, f64):
        bias = torch.where(b, 1.0, -1.0) + i8 + u8 + i16 + i32 + i64
        return (h.float() + bias).to(torch.bfloat16), (f64 * 2.0), i64 + 1, b.logical_not()


def test_tensor_names_are_positional(cnn_bundle):
    assert cnn_bundle.tensor_names(0) == ["input_0"]
    assert cnn_bundle.tensor_names(2) == ["cut2_0"]
    assert cnn_bundle.output_names() == ["output_0"]


@pytest.fixture(scope="module")
def typed_repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    inputs = {
        "h": torch.rand(2, 4).half(),
        "b": torch.rand(2, 4) > 0.5,
        "i8": torch.randint(-100, 100, (2, 4), dtype=torch.int8),
        "u8": torch.randint(0, 255, (2, 4), dtype=torch.uint8),
        "i16": torch.randint(-1000, 1000, (2, 4), dtype=torch.int16),
        "i32": torch.randint(-1000, 1000, (2, 4), dtype=torch.int32),
        "i64": torch.randint(-1000, 1000, (2, 4), dtype=torch.int64),
        "f64": torch.rand(2, 4, dtype=torch.float64),
    }
    bundle = si.compile(_Typed(), tuple(inputs.values()), name="typed")
    if bundle.onnx:  # ONNX Runtime's numpy API has no bfloat16: refused clearly, torch serves it
        assert "bfloat16" in bundle.onnx["refused"] and bundle.runtimes == ("torch",)
    root = tmp_path_factory.mktemp("typed")
    bundle.save(root / "typed")
    return root, inputs


async def test_every_datatype_travels_binary_and_as_json(typed_repository):
    root, inputs = typed_repository
    with torch.no_grad():
        want = _Typed()(*inputs.values())
    datatypes = ["FP16", "BOOL", "INT8", "UINT8", "INT16", "INT32", "INT64", "FP64"]
    async with running(root) as server:
        client = _client(server.url)
        try:
            model = await client.get_model_metadata("typed")
            assert [i["datatype"] for i in model["inputs"]] == datatypes
            assert [o["datatype"] for o in model["outputs"]] == ["BF16", "FP64", "INT64", "BOOL"]
            for binary in (True, False):
                tensors = [
                    _input(f"input_{i}", t.numpy(), dt, binary=binary)
                    for i, (t, dt) in enumerate(zip(inputs.values(), datatypes))
                ]
                outputs = [InferRequestedOutput("output_0", binary_data=True)] + [
                    InferRequestedOutput(f"output_{i}", binary_data=binary) for i in (1, 2, 3)
                ]
                result = await client.infer("typed", tensors, outputs=outputs)
                bf16 = torch.from_numpy(result.as_numpy("output_0").astype(np.float32))
                assert torch.equal(bf16, want[0].float())
                for i in (1, 2, 3):
                    assert np.array_equal(result.as_numpy(f"output_{i}"), want[i].numpy()), i
            with pytest.raises(InferenceServerException, match="BF16, which travels as binary") as err:
                await client.infer(
                    "typed", tensors, outputs=[InferRequestedOutput("output_0", binary_data=False)]
                )
            assert err.value.status() == "400"
        finally:
            await client.close()


async def test_get_model_config_answers_tritons_configuration_from_the_bundles_specs(repository, cnn_bundle):
    async with running(repository, max_batch_size=16) as server:
        client = _client(server.url)
        try:
            config = await client.get_model_config("democnn")
            assert config["name"] == "democnn" and config["max_batch_size"] == 16
            assert config["input"] == [{"name": "input_0", "data_type": "TYPE_FP32", "dims": [3, 32, 32]}]
            assert config["output"] == [{"name": "output_0", "data_type": "TYPE_FP32", "dims": [10]}]
            assert config["parameters"]["graph_hash"] == {"string_value": cnn_bundle.graph_hash}
            again = await client.get_model_config("democnn", model_version=cnn_bundle.version)
            assert again == config
            with pytest.raises(InferenceServerException, match="no model 'nosuchmodel'") as err:
                await client.get_model_config("nosuchmodel")
            assert err.value.status() == "404"
        finally:
            await client.close()


async def test_json_refuses_non_finite_numbers_and_never_answers_a_bare_nan(repository, cnn):
    x = np.random.rand(1, 3, 32, 32).astype(np.float32)
    one = {"name": "input_0", "shape": [1, 3, 32, 32], "datatype": "FP32"}
    async with running(repository) as server, aiohttp.ClientSession() as s:
        url = server.url + "/v2/models/democnn/infer"
        for token in ("NaN", "Infinity", "-Infinity"):
            values = ", ".join([token] + ["0.5"] * 3071)
            body = json.dumps({"inputs": [{**one, "data": []}]}).replace("[]", f"[{values}]")
            async with s.post(url, data=body.encode()) as r:
                assert r.status == 400
                assert f"holds {token}, which is not a JSON number" in (await r.json())["error"]
        overflow = json.dumps({"inputs": [{**one, "data": []}]}).replace("[]", "[1e999" + ", 0" * 3071 + "]")
        async with s.post(url, data=overflow.encode()) as r:
            assert r.status == 400 and "out of the range of FP32" in (await r.json())["error"]
        # NaN in binary input is carried, and the model answers NaN: as JSON it is refused ...
        x[0, 0, 0, 0] = np.nan
        head = {"inputs": [{**one, "parameters": {"binary_data_size": x.nbytes}}]}
        for binary_out in (False, True):
            doc = json.dumps({**head, "parameters": {"binary_data_output": binary_out}}).encode()
            length = {"Inference-Header-Content-Length": str(len(doc))}
            async with s.post(url, data=doc + x.tobytes(), headers=length) as r:
                raw = await r.read()
                if not binary_out:
                    assert r.status == 400 and b"NaN" not in raw.replace(b"holds NaN", b"")
                    assert "ask for it as binary data" in json.loads(raw)["error"]
                    continue
                # ... and as binary data it travels as it is
                assert r.status == 200
                n = int(r.headers["Inference-Header-Content-Length"])
                assert np.isnan(np.frombuffer(raw[n:], dtype=np.float32)).all()
