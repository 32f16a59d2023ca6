"""The application as a whole: configuration, command line, metrics, probes and lifecycle."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import aiohttp
import pytest
import torch
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import splitinfer.cloud
from splitinfer import cli, protocol
from splitinfer._version import __version__
from splitinfer.cloud import ServerConfig, create_app
from splitinfer.cloud._app import create_probe_app
from splitinfer.cloud._state import STATE
from splitinfer.errors import BundleError, ConfigError
from tests.support.cloud import INFER, frame, post, problem_code, running


def test_public_surface():
    assert sorted(splitinfer.cloud.__all__) == ["ServerConfig", "create_app", "create_probe_app", "serve"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"port": 70000}, "port must be 0..65535"),
        ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1"),
        ({"max_queue_delay_ms": -1.0}, "max_queue_delay_ms must be 0..10000"),
        ({"max_queue_length": 0}, "max_queue_length"),
        ({"compute_threads": -1}, "compute_threads must be 0 \\(automatic\\)"),
        ({"torch_threads": -1}, "torch_threads"),
        ({"max_body_bytes": 10}, "max_body_bytes"),
        ({"drain_timeout_s": 0.0}, "drain_timeout_s"),
        ({"response_codec": "nope"}, "response_codec"),
        ({"public_probes": True}, "set --token-file"),
        ({"token_file": "/nonexistent/tokens"}, "not a readable file"),
        ({"metrics_port": 8080}, "metrics_port must differ"),
    ],
)
def test_config_errors_say_how_to_fix(repository, options, message):
    with pytest.raises(ConfigError, match=message):
        ServerConfig(repository=repository, **options)


def test_config_reads_every_field_from_the_environment(repository, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("a-long-enough-token-for-this-test\n")
    env = {
        "SPLITINFER_REPOSITORY": str(repository),
        "SPLITINFER_PORT": "9000",
        "SPLITINFER_MAX_BATCH_SIZE": "32",
        "SPLITINFER_MAX_QUEUE_DELAY_MS": "0.5",
        "SPLITINFER_PUBLIC_PROBES": "yes",
        "SPLITINFER_TOKEN_FILE": str(tokens),
        "SPLITINFER_DRAIN_TIMEOUT_S": "12",
        "SPLITINFER_METRICS_PORT": "9100",
    }
    config = ServerConfig.from_env(env, port=9001)
    assert (config.port, config.max_batch_size, config.max_queue_delay_ms) == (9001, 32, 0.5)
    assert config.public_probes is True and config.token_file == tokens
    assert (config.drain_timeout_s, config.metrics_port) == (12.0, 9100)
    with pytest.raises(ConfigError, match="SPLITINFER_MAX_BATCH_SIZE must be an integer"):
        ServerConfig.from_env({**env, "SPLITINFER_MAX_BATCH_SIZE": "many"})
    with pytest.raises(ConfigError, match="SPLITINFER_PUBLIC_PROBES must be 1/true"):
        ServerConfig.from_env({**env, "SPLITINFER_PUBLIC_PROBES": "maybe"})
    with pytest.raises(ConfigError, match="--repository DIR"):
        ServerConfig.from_env({})


def test_every_config_field_is_a_serve_option_and_an_environment_variable(capsys, repository):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for field in dataclasses.fields(ServerConfig):
        assert f"--{field.name.replace('_', '-')}" in text, field.name
        assert f"SPLITINFER_{field.name.upper()}" in text.replace("\n", "").replace(" ", ""), field.name
    args = cli.build_parser().parse_args(
        ["serve", "--repository", str(repository), "--max-batch-size", "4", "--public-probes"]
    )
    assert all(hasattr(args, f.name) for f in dataclasses.fields(ServerConfig))
    assert (args.max_batch_size, args.public_probes, args.port) == (4, True, None)


async def test_metrics_are_valid_prometheus_text_with_every_family(repository, cnn_bundle):
    async with running(repository) as server, aiohttp.ClientSession() as s:
        await post(s, server.url + INFER, frame(cnn_bundle, 4, torch.rand(1, 3, 32, 32)))
        await post(s, server.url + INFER, b"garbage")
        async with s.get(server.url + "/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    kinds = {
        "splitinfer_requests": "counter",
        "splitinfer_request_duration_seconds": "histogram",
        "splitinfer_request_payload_bytes": "histogram",
        "splitinfer_response_payload_bytes": "histogram",
        "splitinfer_batch_size": "histogram",
        "splitinfer_rejections": "counter",
        "splitinfer_inflight_requests": "gauge",
        "splitinfer_queue_depth": "gauge",
        "splitinfer_ready": "gauge",
        "splitinfer_build_info": "gauge",
    }
    for name, kind in kinds.items():
        assert families[name].type == kind, name
    stages = {s.labels["stage"] for s in families["splitinfer_request_duration_seconds"].samples}
    assert stages >= {"queue", "decode", "compute", "encode", "total"}
    codes = {
        s.labels["code"]: s.value
        for s in families["splitinfer_requests"].samples
        if s.name.endswith("_total")
    }
    assert codes == {"ok": 1.0, "malformed_frame": 1.0}
    (build,) = families["splitinfer_build_info"].samples
    assert build.value == 1.0 and build.labels["version"] == __version__


async def test_a_separate_metrics_port_serves_metrics_and_probes(repository):
    config = ServerConfig(repository=repository, metrics_port=0)
    app = create_app(config, registry=CollectorRegistry())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    probe = web.AppRunner(create_probe_app(app), access_log=None)
    await probe.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        await web.TCPSite(probe, "127.0.0.1", 0).start()
        api, probes = (f"http://127.0.0.1:{r.addresses[0][1]}" for r in (runner, probe))
        async with aiohttp.ClientSession() as s:
            async with s.get(api + "/metrics") as r:
                assert r.status == 404  # not on the API port
            async with s.get(probes + "/metrics") as r:
                assert r.status == 200
                assert "splitinfer_build_info" in await r.text()
            async with s.get(probes + "/v2/health/ready") as r:
                assert r.status == 200
            app[STATE].drain.begin()
            async with s.get(probes + "/v2/health/ready") as r:
                assert r.status == 503
    finally:
        await probe.cleanup()
        await runner.cleanup()


async def test_draining_refuses_new_requests_and_closes_connections(repository, cnn_bundle):
    async with running(repository) as server, aiohttp.ClientSession() as s:
        server.app[STATE].drain.begin()
        status, headers, body = await post(
            s, server.url + INFER, frame(cnn_bundle, 5, torch.rand(1, 3, 32, 32))
        )
        assert (status, problem_code(status, headers, body)) == (503, "not_ready")
        assert headers["Connection"] == "close" and headers["Retry-After"] == "1"
        async with s.get(server.url + "/v2/health/ready") as r:
            assert r.status == 503
        async with s.get(server.url + "/v2/health/live") as r:
            assert r.status == 200


async def test_model_listing_says_what_the_server_accepts(repository, cnn_bundle):
    async with running(repository, max_batch_size=8) as server, aiohttp.ClientSession() as s:
        async with s.get(server.url + "/v1/models/democnn") as r:
            doc = await r.json()
        assert doc["graph_hash"] == cnn_bundle.graph_hash
        assert doc["codecs"] == cnn_bundle.codecs
        assert doc["max_batch_size"] == 8
        assert len(doc["cuts"]) == len(cnn_bundle.cuts)
        async with s.get(server.url + "/v1/models/nope") as r:
            assert (r.status, (await r.json(content_type=None))["code"]) == (404, "unknown_model")


async def test_an_empty_repository_fails_the_start_loudly(tmp_path: Path):
    app = create_app(ServerConfig(repository=tmp_path), registry=CollectorRegistry())
    runner = web.AppRunner(app, access_log=None)
    with pytest.raises(BundleError, match="no bundle"):
        await runner.setup()
    await runner.cleanup()


def test_create_app_wants_a_config():
    with pytest.raises(ConfigError, match="ServerConfig"):
        create_app({"repository": "."})  # type: ignore[arg-type]


async def test_unexpected_errors_are_500_problem_json_without_a_trace(repository, cnn_bundle, monkeypatch):
    from splitinfer.cloud import _handlers

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(_handlers, "_check", broken)
    async with running(repository) as server, aiohttp.ClientSession() as s:
        status, headers, body = await post(
            s, server.url + INFER, frame(cnn_bundle, 4, torch.rand(1, 3, 32, 32))
        )
    assert (status, problem_code(status, headers, body)) == (500, "internal")
    assert b"secret" not in body and b"Traceback" not in body
    assert protocol.parse_server_timing(headers["Server-Timing"])["total"] > 0


async def test_a_link_probe_is_read_dropped_and_timed(repository, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    async with running(repository, token_file=tokens) as server, aiohttp.ClientSession() as s:
        url, auth = server.url + "/v1/link-probe", {"Authorization": "Bearer s3cret"}
        status, headers, body = await post(s, url, bytes(64 * 1024), headers=auth)
        assert (status, body) == (204, b"")
        assert set(protocol.parse_server_timing(headers["Server-Timing"])) == {"receive", "total"}
        status, headers, body = await post(s, url, b"", headers=auth)  # the round-trip probe
        assert status == 204
        status, headers, body = await post(s, url, io.BytesIO(bytes(2 * 1024 * 1024)), headers=auth)
        assert problem_code(status, headers, body) == "too_large"
        status, headers, body = await post(s, url, b"")  # behind the same tokens as inference
        assert status == 401
