"""Starting the server as ``serve`` does: the port is bound before any model loads."""

from __future__ import annotations

import socket

import pytest
from prometheus_client import CollectorRegistry

from splitinfer.bundle import Bundle
from splitinfer.cloud import ServerConfig, serve
from splitinfer.errors import ConfigError


def test_a_port_in_use_is_reported_before_any_model_loads(tmp_path, cnn_bundle: Bundle):
    # a bundle that would fail to load: had it loaded first, its BundleError would come out
    cnn_bundle.save(tmp_path / "democnn")
    segment = tmp_path / "democnn" / "segment_000.pt2"
    segment.write_bytes(segment.read_bytes()[::-1])
    registry = CollectorRegistry()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = ServerConfig(repository=tmp_path, host="127.0.0.1", port=port)
        with pytest.raises(ConfigError, match=rf"cannot listen on 127\.0\.0\.1:{port}: .*pick another"):
            serve(config, registry=registry, announce=lambda line: None)
    loads = [s for m in registry.collect() for s in m.samples if s.name.startswith("splitinfer_model_loads")]
    assert loads == []  # not even tried


def test_a_taken_metrics_port_is_reported_before_any_model_loads(tmp_path, cnn_bundle: Bundle):
    cnn_bundle.save(tmp_path / "democnn")
    registry = CollectorRegistry()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = ServerConfig(repository=tmp_path, host="127.0.0.1", port=0, metrics_port=port)
        with pytest.raises(ConfigError, match=rf"127\.0\.0\.1:{port}"):
            serve(config, registry=registry, announce=lambda line: None)
    loads = [s for m in registry.collect() for s in m.samples if s.name.startswith("splitinfer_model_loads")]
    assert loads == []
