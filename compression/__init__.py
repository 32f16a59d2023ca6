"""splitinfer.compression: tensor codecs named by short spec strings (``q4c+zstd3``).

>>> codec = get_codec("q8+zstd1")
>>> tensors = codec.decode(codec.encode([torch.randn(2, 3)]))         # torch in, torch out
>>> arrays = codec.decode_numpy(codec.encode([np.ones((2, 3), "f4")]))  # numpy, never torch

The codecs work on numpy (importing this package loads no torch): ``encode`` takes torch tensors
or numpy arrays and gives the same bytes for the same values either way; ``decode`` returns
torch tensors (it imports torch), ``decode_numpy`` numpy arrays of the encoded dtypes and shapes,
except bfloat16, which numpy lacks: those decode to float32 arrays holding the bfloat16 values.
:func:`calibrate` takes either as well.

Specs are ``<base>[+zstd<level 1..22>]`` (or ``q<bits>[c]+ans``: the codes rANS-coded under
per-channel statistics that travel in the blob, ``_ans.py``, with the ``entropy`` extra) with
base ``f32 | f16 | bf16`` (cast), ``q2``..``q8`` (uniform affine quantization, one range per
tensor), ``q2c``..``q8c`` (one range per channel, dim 1, for tensors of 3+ dims; others, such as
``N x C`` pooled features, get one range) or ``jpeg1``..``jpeg100`` (float image
batches ``N x 3 x H x W``; each colour channel mapped from its calibrated range, or else from
its min/max over the batch, to 0..255). Blobs are self-describing: ranges, scales, shapes and
dtypes travel in the header, and decoding checks every field and size before it allocates
(``CodecError`` for anything truncated, corrupt or larger than ``max_nbytes``). Integer and
bool tensors travel unchanged in every codec except ``jpeg``, which refuses anything but float
image batches.

Channel projection: ``pca<r>q<bits>[+ans|+zstd<level>]`` sends the first ``r`` principal
components of the channel vectors of a single-tensor frontier ``N x C x ...``, quantized on one
step for all components (``_projection.py``); an ``r`` beyond the projection's components
keeps them all (``pca4096q7`` is a full decorrelating rotation at any cut). It must be bound
to the projection fitted on the cut's calibration frontier
(``get_codec(spec, projection=fit(samples))``; bundles do it in ``codec_for`` and
``decoder_for``), on both sides.

Trained bottleneck: ``bn<latent>q<bits>[+ans|+zstd<level>]`` sends the integer codes of an
encoder network trained at compile time for one cut (``latent`` channels of ``bits`` bits), and
the cloud's decoder network turns them back into the frontier (``_bottleneck.py``). It must be
bound to that cut's :class:`TrainedBottleneck` (the encoder and decoder as numpy functions,
``get_codec(spec, bottleneck=...)``; bundles do it in ``codec_for`` and ``decoder_for``).

Ranges: a quantized codec uses each tensor's (or channel's) min/max at encode time, or the
ranges it is bound to with ``get_codec(spec, clip=calibrate(samples, spec, "mse"))``; see
:class:`ClipRanges` for their JSON form.

Dictionaries: a ``+zstd<level>`` codec may be bound to a zstd dictionary trained per cut
(``get_codec(spec, dictionary=...)``, ``_dictionary.py``; bundles do it in ``codec_for``). Its
blobs carry the dictionary's id, and a decoder bound to another dictionary, or to none,
refuses them with a CodecError that names both.

Bundles and the partitioner bind codecs with the names above too: :func:`parse_spec` reads a
spec, :func:`fit_projection` and :func:`train_dictionary` make what a cut's codecs are bound to,
:func:`calibrate_all` its ranges, and :func:`payload_of` gives the bytes a codec hands to zstd
(what a dictionary is trained on).
The building blocks of the codecs (bit packing, affine quantization, rANS) are public in
:mod:`splitinfer.compression.primitives`, for measuring them and for writing a new codec.

Non-finite values: every codec returns NaN, +inf and -inf exactly where they were.

- ``f32`` keeps them bit for bit (``f16``/``bf16`` keep them too; finite floats beyond the f16
  range become ±inf, as a cast does);
- the lossy codecs (quantized, JPEG) carry a *patch*: the positions and values of the non-finite
  entries of each floating tensor, after the data, written only when there are some (a finite
  frontier's blob is what it always was; ``_nonfinite.py`` has the layout). Quantization ranges
  measured at encode time ignore non-finite values (a tensor or channel with none finite gets
  the range ``[0, 0]``); range ends are limited to ±1e38 so that every decoded finite value is a
  finite float32.

The codec contract (for a new codec): see ``_codec._Adapters``. A codec encodes wire arrays
to a blob framed by ``_blob.write_blob`` and decodes it, checking every field and size before it
allocates; the adapters give it torch and numpy in and out, and, unless it declares
``lossless_nonfinite``, the non-finite patch, so its encoder must only keep non-finite inputs
from spoiling the finite values (``_quant.sanitize`` measures ranges without them).
"""

from splitinfer.compression._bottleneck import TrainedBottleneck
from splitinfer.compression._calibrate import CALIBRATION_METHODS, ClipRanges, calibrate, calibrate_all
from splitinfer.compression._codec import DEFAULT_MAX_NBYTES, Codec, available_codecs, get_codec, payload_of
from splitinfer.compression._dictionary import MAX_SIZE as MAX_DICTIONARY_BYTES
from splitinfer.compression._dictionary import ZstdDictionary
from splitinfer.compression._dictionary import train as train_dictionary
from splitinfer.compression._projection import MAX_CHANNELS as MAX_PROJECTION_CHANNELS
from splitinfer.compression._projection import ChannelProjection
from splitinfer.compression._projection import fit as fit_projection
from splitinfer.compression._spec import Spec, parse_spec

__all__ = [
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
]
