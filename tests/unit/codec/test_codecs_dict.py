"""zstd dictionaries: training, binding, the id on the wire, bundles and the server's check."""

import msgpack
import pytest
import torch

import splitinfer as si
from splitinfer import protocol
from splitinfer.cloud._compute import decode_frame
from splitinfer.cloud._problem import Problem
from splitinfer.compression import get_codec
from splitinfer.compression._codec import payload_of
from splitinfer.compression._dictionary import ZstdDictionary, train
from splitinfer.errors import BundleError, CodecError
from splitinfer.tensors import specs_of
from tests.conftest import TORCH_ONLY
from tests.support.zoo import ZOO, batched


def _frontiers(count=24, seed=0):
    """Small, similar activations (post-ReLU features of a pooled cut), one per request."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 256, generator=gen)
    return [[(base + 0.05 * torch.randn(1, 256, generator=gen)).relu()] for _ in range(count)]


@pytest.fixture(scope="module")
def dictionary():
    codec = get_codec("q8+zstd3")
    d = train([payload_of(codec, f) for f in _frontiers()], "q8+zstd3")
    assert d is not None
    return d


def test_a_bound_codec_round_trips_and_names_its_dictionary(dictionary):
    frontier = _frontiers(1, seed=7)[0]
    bound = get_codec("q8+zstd3", dictionary=dictionary)
    blob = bound.encode(frontier)
    header = msgpack.Unpacker(raw=False)
    header.feed(blob)
    assert header.unpack()[4] == dictionary.id
    plain = get_codec("q8+zstd3").encode(frontier)
    assert torch.equal(bound.decode(blob)[0], get_codec("q8+zstd3").decode(plain)[0])
    assert bound.decode(plain)[0].shape == (1, 256)  # a bound decoder reads plain blobs too


def test_a_decoder_without_the_same_dictionary_refuses_the_blob(dictionary):
    blob = get_codec("q8+zstd3", dictionary=dictionary).encode(_frontiers(1)[0])
    with pytest.raises(CodecError, match=f"dictionary '{dictionary.id}', this decoder has none"):
        get_codec("q8+zstd3").decode(blob)
    other = ZstdDictionary(dictionary.data[:-1] + b"x")
    with pytest.raises(CodecError, match=f"this decoder has dictionary {other.id}"):
        get_codec("q8+zstd3", dictionary=other).decode(blob)


def test_dictionary_misuse_is_a_codec_error(dictionary):
    with pytest.raises(CodecError, match="no zstd stage"):
        get_codec("q8", dictionary=dictionary)
    with pytest.raises(CodecError, match="ZstdDictionary"):
        get_codec("q8+zstd1", dictionary=b"raw bytes")  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        ZstdDictionary(b"")
    assert train([b"ab"] * 3, "q8+zstd1") is None  # too little to learn from


@pytest.fixture(scope="module")
def mlp_bundle(dictionary):
    model, inputs = ZOO["mlp"]()
    bundle = si.compile(
        model,
        inputs,
        name="mlp",
        calibration=[batched(inputs, 1, seed=i) for i in range(4)],
        evaluation=[batched(inputs, 1, seed=10 + i) for i in range(2)],
        codecs=["f32", "q8+zstd3"],
        calibration_method="minmax",
        runtimes=TORCH_ONLY,
    )
    k = 1
    bundle.dictionaries = {str(k): {"q8+zstd3": dictionary}}
    return bundle, inputs, k


def test_bundles_store_dictionaries_as_checked_files(tmp_path, mlp_bundle, dictionary):
    bundle, inputs, k = mlp_bundle
    path = bundle.save(tmp_path / "b")
    loaded = si.Bundle.load(path)
    assert loaded.dictionaries == {str(k): {"q8+zstd3": dictionary}}
    assert loaded.codec_for(k, "q8+zstd3").dictionary == dictionary
    assert loaded.codec_for(0, "q8+zstd3").dictionary is None
    frontier = list(loaded.head(k, *inputs))
    blob = loaded.codec_for(k, "q8+zstd3").encode(frontier)
    assert torch.allclose(loaded.decoder_for(k, "q8+zstd3").decode(blob)[0], frontier[0], atol=0.05)
    name = next(p for p in path.iterdir() if p.name.startswith("dict_"))
    name.write_bytes(name.read_bytes()[:-1] + b"?")
    with pytest.raises(BundleError, match="sha256"):
        si.Bundle.load(path)


def test_the_server_refuses_a_payload_made_with_another_dictionary(mlp_bundle, dictionary):
    bundle, inputs, k = mlp_bundle
    frontier = list(bundle.head(k, *inputs))
    header = protocol.RequestHeader(
        model="mlp",
        graph=bundle.graph_hash,
        cut=k,
        codec="q8+zstd3",
        tensors=specs_of(frontier),
        request_id="r",
        deadline_s=None,
        payload_nbytes=0,
    )
    good = bundle.codec_for(k, "q8+zstd3").encode(frontier)
    assert decode_frame(header, memoryview(good), bundle)[0].shape == frontier[0].shape
    other = ZstdDictionary(dictionary.data[:-1] + b"x")
    bad = get_codec("q8+zstd3", dictionary=other).encode(frontier)
    with pytest.raises(Problem) as caught:
        decode_frame(header, memoryview(bad), bundle)
    assert caught.value.code == "malformed_frame"
    assert f"zstd dictionary '{other.id}', this decoder has dictionary {dictionary.id}" in str(caught.value)


def _relu_model():
    """A model whose hidden ReLU features are a small, recurring payload (a pooled-features-like
    cut): similar inputs switch on the same units with similar values."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 512), torch.nn.ReLU(), torch.nn.Linear(512, 4)).eval()


def _similar_inputs(count: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 16, generator=torch.Generator().manual_seed(99))
    return [(base + 0.02 * torch.randn(1, 16, generator=gen),) for _ in range(count)]


def test_compile_keeps_a_dictionary_that_pays_and_the_bundle_serves_with_it(tmp_path):
    model, calibration = _relu_model(), _similar_inputs(40, seed=1)
    options = dict(
        name="dict", calibration=calibration, codecs=["f32", "q8+zstd3"], calibration_method="minmax"
    )
    plain = si.compile(model, calibration[0], **options, runtimes=TORCH_ONLY)
    bundle = si.compile(model, calibration[0], zstd_dictionaries=True, **options, runtimes=TORCH_ONLY)
    assert plain.dictionaries == {}
    assert bundle.dictionaries, "no dictionary kept on a recurring 512-value payload"
    for cut, by_spec in bundle.dictionaries.items():
        assert set(by_spec) == {"q8+zstd3"}  # f32 has no zstd stage
        k = int(cut)
        with_dict = next(r for r in bundle.fidelity["table"] if r["cut"] == k and r["codec"] == "q8+zstd3")
        without = next(r for r in plain.fidelity["table"] if r["cut"] == k and r["codec"] == "q8+zstd3")
        assert with_dict["bytes"] <= 0.97 * without["bytes"]  # kept only when it saves >= 3 %

    loaded = si.Bundle.load(bundle.save(tmp_path / "b"))
    assert loaded.dictionaries == bundle.dictionaries
    k = int(next(iter(loaded.dictionaries)))
    (x,) = _similar_inputs(1, seed=7)[0]
    frontier = list(loaded.head(k, x))
    encoder = loaded.codec_for(k, "q8+zstd3")
    without = get_codec("q8+zstd3", clip=encoder.clip)  # the same calibrated ranges, no dictionary
    blob = encoder.encode(frontier)
    assert len(blob) < len(without.encode(frontier))
    decoded = loaded.decoder_for(k, "q8+zstd3").decode(blob)
    assert torch.equal(decoded[0], without.decode(without.encode(frontier))[0])
    with pytest.raises(CodecError, match="dictionary"):
        get_codec("q8+zstd3").decode(blob)  # a peer without the bundle's dictionary refuses it
    out = loaded.tail(k, decoded)
    assert torch.allclose(out, model(x), atol=0.05)
