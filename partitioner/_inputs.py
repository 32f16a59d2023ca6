"""Inputs for compile's calibration and evaluation: checked before the slow steps, and read
from files or folders of images for the CLI.

:func:`check_inputs` holds every calibration, evaluation (and training) input against the
example inputs before anything is captured, so that a wrong shape is reported at once, naming
the argument, the input's position, the shape expected and the fix. :func:`read_inputs` reads
what the CLI's ``--calibration`` and ``--evaluation`` take: a tensor file (``.pt``/``.npz``,
N rows along the batch dim) or a folder of images (:func:`load_images`).

Images (docs/fidelity.md): every ``.jpg``/``.jpeg``/``.png``/``.bmp``/``.webp`` file of the
folder in name order, converted to RGB, the shorter side resized to ``image_size * 256 / 224``
(bilinear) and the centre ``image_size`` x ``image_size`` cropped, scaled to [0, 1] and
normalised with ImageNet's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), as
torchvision's ImageNet models expect; ``normalize=False`` keeps [0, 1]. The label of an image
is the integer its file name starts with (``042_n01644373_tree_frog.jpg`` is class 42); a
folder whose files have no such number is unlabelled. Reading images needs Pillow
(``pip install 'splitinfer[examples]'``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from splitinfer.errors import ConfigError
from splitinfer.partitioner import _words as words

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "check_fidelity_inputs",
    "check_inputs",
    "load_images",
    "read_inputs",
    "read_tensors",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def check_inputs(
    key: str, items: Iterable[Any] | None, example_inputs: Sequence[torch.Tensor]
) -> list[tuple[Any, ...]] | None:
    """``items`` as a list of input tuples, each checked against ``example_inputs``: as many
    tensors, each with a batch dim in front of the example's other dims and its dtype.

    ``key`` names the argument (``calibration``, ``evaluation``, ``training``) in the words of
    the interface in use (``_words``). ConfigError naming the argument, the position, the shape
    expected and the fix."""
    if items is None:
        return None
    if isinstance(items, torch.Tensor):
        raise ConfigError(
            f"{words.name(key)} must be a list of inputs, one tuple (or tensor) each, not one tensor: "
            f"pass [(x,) for x in batch.split(1)] or list(batch.split(1))"
        )
    checked = [tuple(item) if isinstance(item, tuple | list) else (item,) for item in items]
    if not checked:
        raise ConfigError(f"{words.name(key)} is empty: give at least one input")
    for i, item in enumerate(checked):
        where = f"{words.name(key)} input {i} (of {len(checked)})"
        if len(item) != len(example_inputs):
            raise ConfigError(
                f"{where} has {len(item)} tensor(s); the model takes {len(example_inputs)} (one per "
                "example input): give each input as a tuple of them"
            )
        for j, (t, want) in enumerate(zip(item, example_inputs)):
            if not isinstance(t, torch.Tensor):
                raise ConfigError(f"{where}: tensor {j} is a {type(t).__name__}; give torch tensors")
            expected = f"{want.dtype}[Bx{_shape(want.shape[1:])}]".replace("torch.", "")
            got = f"{t.dtype}[{_shape(t.shape)}]".replace("torch.", "")
            if tuple(t.shape) == tuple(want.shape[1:]):
                raise ConfigError(
                    f"{where}: tensor {j} is {got}, expected {expected} (batch first): add a batch "
                    f"dimension, e.g. x.unsqueeze(0), as in [(x.unsqueeze(0),) for x in images]"
                )
            if t.dim() != want.dim() or tuple(t.shape[1:]) != tuple(want.shape[1:]) or t.shape[0] < 1:
                raise ConfigError(
                    f"{where}: tensor {j} is {got}, expected {expected} like the example input: "
                    "give inputs of the shape the model was captured at"
                )
            if t.dtype != want.dtype:
                raise ConfigError(
                    f"{where}: tensor {j} is {got}, expected {expected}: convert it, e.g. x.to({want.dtype})"
                )
    return checked


def rows(items: Sequence[tuple[Any, ...]]) -> int:
    """The number of rows (batch entries) of checked inputs."""
    return sum(int(item[0].shape[0]) for item in items)


def check_fidelity_inputs(
    example_inputs: Sequence[torch.Tensor],
    calibration: Iterable[Any] | None,
    evaluation: Iterable[Any] | None,
    labels: Sequence[int] | None,
    codecs: Sequence[str] | None,
) -> tuple[list[tuple[Any, ...]] | None, list[tuple[Any, ...]] | None]:
    """compile's calibration and evaluation inputs, checked before anything slow runs
    (:func:`check_inputs`), with what goes with them: evaluation and labels need calibration,
    lossy codecs need calibration, and there is one label per evaluation row (per calibration
    row without evaluation)."""
    cal = check_inputs("calibration", calibration, example_inputs)
    ev = check_inputs("evaluation", evaluation, example_inputs)
    if cal is None:
        lossy = [c for c in (codecs or []) if isinstance(c, str) and not c.startswith("f32")]
        if lossy:
            raise ConfigError(
                f"lossy codecs {lossy} need calibration inputs to measure their fidelity: pass "
                f"{words.example('calibration')} (a few dozen inputs like production traffic)"
            )
        if ev is not None:
            raise ConfigError(
                f"{words.name('evaluation')} inputs need {words.name('calibration')} inputs too "
                "(the codecs' ranges are calibrated on those)"
            )
        if labels is not None:
            raise ConfigError(
                f"{words.name('labels')} label evaluation or calibration inputs: give those too"
            )
    if labels is not None:
        if isinstance(labels, str) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise ConfigError(f"{words.name('labels')} must be a list of class indices (ints)")
        on, items = ("evaluation", ev) if ev is not None else ("calibration", cal)
        assert items is not None
        if len(labels) != rows(items):
            raise ConfigError(
                f"{words.name('labels')}: {len(labels)} label(s) for {rows(items)} {words.name(on)} "
                "input row(s): give one class index per row"
            )
    return cal, ev


def read_inputs(
    path: str, flag: str, n_inputs: int, *, image_size: int | None, normalize: bool = True
) -> tuple[list[tuple[torch.Tensor, ...]], list[int] | None]:
    """The inputs (one row each) and labels (None: unlabelled) in a tensor file or an image
    folder given to the CLI as ``flag``."""
    p = Path(path)
    if p.is_dir():
        if n_inputs != 1:
            raise ConfigError(f"{flag} {path}: a folder of images serves models of one image input")
        if image_size is None:
            raise ConfigError(f"{flag} {path} is a folder of images: give --image-size N (e.g. 224)")
        batch, labels = load_images(p, image_size, flag=flag, normalize=normalize)
        return [(t,) for t in batch.split(1)], labels
    tensors = read_tensors(path, flag)
    if len(tensors) != n_inputs:
        raise ConfigError(
            f"{flag} {path} holds {len(tensors)} tensor(s); the model takes {n_inputs} input(s): give one "
            "tensor per model input, N rows each"
        )
    n = tensors[0].shape[0] if tensors[0].dim() else 0
    for j, t in enumerate(tensors):
        if t.dim() == 0 or t.shape[0] != n:
            raise ConfigError(
                f"{flag} {path}: tensor {j} has shape {tuple(t.shape)}; every tensor needs the same "
                f"number of rows along dim 0 ({n} in tensor 0)"
            )
    return [tuple(t[i : i + 1] for t in tensors) for i in range(n)], None


def load_images(
    folder: Path, image_size: int, *, flag: str = "images", normalize: bool = True
) -> tuple[torch.Tensor, list[int] | None]:
    """The images of ``folder`` as one float32 batch ``N x 3 x S x S`` and their labels (module
    docstring), or None where the file names carry no class index."""
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError(
            f"{flag} {folder}: reading images needs Pillow: pip install 'splitinfer[examples]'"
        ) from None
    if not isinstance(image_size, int) or image_size < 8:
        raise ConfigError(f"--image-size must be an int >= 8, got {image_size!r}")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise ConfigError(f"{flag} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    numbers = [re.match(r"\d+", f.name) for f in files]
    labelled = [m is not None for m in numbers]
    if any(labelled) and not all(labelled):
        bad = next(f.name for f, ok in zip(files, labelled) if not ok)
        raise ConfigError(
            f"{flag} {folder}: some image names start with a class index and {bad!r} does not: name "
            "every image NNN_... (its class) or none"
        )
    resize = round(image_size * 256 / 224)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = torch.empty(len(files), 3, image_size, image_size)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                rgb = im.convert("RGB")
        except Exception as exc:  # PIL raises many kinds; say which file
            raise ConfigError(f"{flag}: cannot read image {f}: {exc}") from None
        w, h = rgb.size
        scale = resize / min(w, h)
        size = (max(image_size, round(w * scale)), max(image_size, round(h * scale)))
        rgb = rgb.resize(size, Image.Resampling.BILINEAR)
        w, h = rgb.size
        left, top = (w - image_size) // 2, (h - image_size) // 2
        rgb = rgb.crop((left, top, left + image_size, top + image_size))
        x = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(image_size, image_size, 3)
        x = x.permute(2, 0, 1).float() / 255.0
        out[i] = (x - mean) / std if normalize else x
    labels = [int(m.group()) for m in numbers if m is not None] if all(labelled) else None
    return out, labels


def read_tensors(path: str, what: str) -> list[Any]:
    """The tensors in a ``.pt`` file (a tensor or a tuple/list of them; ``torch.load`` with
    ``weights_only=True``: no code runs) or a ``.npz`` file (its arrays in order)."""
    import numpy as np

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what}: no file {path!r}")
    try:
        if file.suffix == ".npz":
            with np.load(file, allow_pickle=False) as data:
                return [torch.from_numpy(np.array(data[k])) for k in data.files]
        if file.suffix in (".pt", ".pth"):
            loaded = torch.load(file, weights_only=True, map_location="cpu")
        else:
            raise ConfigError(f"{what} takes a .pt or .npz file, got {path!r}")
    except ConfigError:
        raise
    except Exception as exc:  # pickle, zip and numpy errors: say what the file must hold
        raise ConfigError(f"{what}: cannot read {path!r}: {type(exc).__name__}: {exc}") from None
    tensors = [loaded] if isinstance(loaded, torch.Tensor) else loaded
    if (
        not isinstance(tensors, list | tuple)
        or not tensors
        or not all(isinstance(t, torch.Tensor) for t in tensors)
    ):
        raise ConfigError(
            f"{what}: {path!r} must hold a tensor or a tuple/list of tensors, one per model input"
        )
    return list(tensors)
