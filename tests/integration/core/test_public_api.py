"""The public surface of each package is exactly this list (httpx's test_exported_members)."""

import importlib

import pytest

PUBLIC = {
    "splitinfer": ["Bundle", "Cut", "Manifest", "SplitInferError", "TensorSpec", "__version__", "compile"],
    "splitinfer.compression": [
        "CALIBRATION_METHODS",
        "DEFAULT_MAX_NBYTES",
        "MAX_DICTIONARY_BYTES",
        "MAX_PROJECTION_CHANNELS",
        "ChannelProjection",
        "ClipRanges",
        "Codec",
        "Spec",
        "TrainedBottleneck",
        "ZstdDictionary",
        "available_codecs",
        "calibrate",
        "calibrate_all",
        "fit_projection",
        "get_codec",
        "parse_spec",
        "payload_of",
        "train_dictionary",
    ],
    "splitinfer.compression.primitives": [
        "affine",
        "channel_view",
        "decode_codes",
        "dequantize",
        "encode_codes",
        "pack_bits",
        "packed_nbytes",
        "quantize",
        "sanitize",
        "unpack_bits",
    ],
    "splitinfer.partitioner": [
        "Candidate",
        "CostModel",
        "Decision",
        "EnergyModel",
        "Estimates",
        "Estimator",
        "Explanation",
        "Policy",
        "TablePolicy",
        "chain_times",
        "compile",
        "hedge_after",
        "latency_weights",
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
    "splitinfer.lab": [
        "CALIBRATION_PHOTOS",
        "EVALUATION_PHOTOS",
        "Link",
        "Recording",
        "ServerProcess",
        "World",
        "compile_on_photos",
        "demo_model",
        "efficientnet_lite0",
        "format_summary",
        "kind_of",
        "photo_batch",
        "prepare",
        "sample_photos",
    ],
    "splitinfer.lab.evaluation": [
        "Device",
        "Link",
        "MODELS",
        "POLICIES",
        "Record",
        "SharedResult",
        "TuningLink",
        "World",
        "cache_root",
        "choose_static",
        "kind_of",
        "live_stack",
        "median_rate",
        "p95",
        "prepare_bundle",
        "run_priced",
        "run_shared",
        "static_choice",
        "stretch",
        "summarize",
        "tie_slowdown",
        "tuning_links",
        "write_csv",
    ],
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
