"""An app that embeds the edge SDK: classify real photos with EfficientNet-Lite0, split adaptively.

    # once: compile the model with calibration and a profile (about a minute)
    python examples/classify_photos.py prepare --out models/efficientnet-lite0
    # the cloud (another terminal)
    splitinfer serve --repository models
    # the app: an emulated device 8x slower than this machine
    python examples/classify_photos.py run --url http://127.0.0.1:8080 --bundle models/efficientnet-lite0

Each line shows the photo, the class the split model predicts, where the model was cut, the
codec, the bytes sent and the latency. When the cloud is down the app keeps answering: the SDK
finishes every request on the device and says why.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from splitinfer.edge import EdgeClient
from splitinfer.lab import compile_on_photos, efficientnet_lite0, photo_batch, sample_photos


def prepare(args: argparse.Namespace) -> int:
    bundle = compile_on_photos(
        efficientnet_lite0(), name="efficientnet-lite0", calibration=args.calibration, profile=True
    )
    print(f"wrote {bundle.save(args.out)}")
    return 0


def run(args: argparse.Namespace) -> int:
    photos = sample_photos()
    images = photo_batch(len(photos), seed=0)  # one crop of each photo, normalised
    with EdgeClient(
        args.url, bundle=args.bundle, policy=args.policy, device_slowdown=args.device_slowdown, deadline_s=5.0
    ) as client:
        for (name, _), image in zip(photos, images):
            logits = client.infer(image.unsqueeze(0))
            t = client.last_trace
            assert t is not None  # set by every infer
            where = "device" if t.cut == client.bundle.last_cut else f"cut {t.cut} {t.codec}"
            note = f"  (fell back: {t.fallback})" if t.fallback else ""
            print(
                f"{name:<12} class {int(logits.argmax()):>4}  {where:<22} {t.bytes_up:>8} B up  "
                f"{t.stages['total'] * 1000:7.1f} ms{note}"
            )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="compile EfficientNet-Lite0 into a bundle")
    p.add_argument("--out", type=Path, default=Path("models/efficientnet-lite0"))
    p.add_argument("--calibration", type=int, default=32, help="calibration crops")
    p.set_defaults(func=prepare)
    r = sub.add_parser("run", help="classify the sample photos through the cloud")
    r.add_argument("--url", default="http://127.0.0.1:8080")
    r.add_argument("--bundle", type=Path, default=Path("models/efficientnet-lite0"))
    r.add_argument("--policy", default="adaptive")
    r.add_argument("--device-slowdown", type=float, default=8.0)
    r.set_defaults(func=run)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
