"""The public surface of each package is exactly this list (httpx's test_exported_members)."""

import importlib

import pytest

PUBLIC = {
    "splitinfer": ["Bundle", "Cut", "Manifest", "SplitInferError", "TensorSpec", "__version__", "compile"],
    "splitinfer.compression": [
        "DEFAULT_MAX_NBYTES",
        "ClipRanges",
        "Codec",
        "available_codecs",
        "calibrate",
        "get_codec",
    ],
    "splitinfer.partitioner": [
        "Candidate",
        "Decision",
        "EnergyModel",
        "Estimates",
        "Estimator",
        "Explanation",
        "Policy",
        "compile",
        "hedge_after",
        "make_policy",
        "profile_bundle",
    ],
    "splitinfer.edge": [
        "CircuitBreaker",
        "ClientConfig",
        "EdgeClient",
        "HttpTransport",
        "InProcessTransport",
        "Trace",
        "Transport",
        "TransportRequest",
        "TransportResponse",
    ],
    "splitinfer.cloud": ["ServerConfig", "create_app", "create_probe_app", "serve"],
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_exported_members(name):
    module = importlib.import_module(name)
    assert sorted(module.__all__) == sorted(PUBLIC[name])
    for member in module.__all__:
        assert hasattr(module, member), member


def test_core_does_not_import_edge_or_cloud():
    import subprocess
    import sys

    code = (
        "import sys, splitinfer, splitinfer.partitioner, splitinfer.compression;"
        "bad = [m for m in sys.modules if m.startswith(('splitinfer.edge', 'splitinfer.cloud'))];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
