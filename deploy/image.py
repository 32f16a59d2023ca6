"""Build the splitinfer server images (`make image`): deploy/Dockerfile, both variants.

    python deploy/image.py [--variant onnxruntime|torch|all] [--base IMAGE|debian-local] [--tag T]

* The engine is podman where it is installed, else docker (``--engine`` to choose).
* ``--base`` is the Dockerfile's BASE: the slim Python image by default; ``debian-local`` builds
  (once, then cached as ``localhost/splitinfer-base:bookworm``) a Debian bookworm base from
  Debian's packages with mmdebstrap, for machines that cannot pull from an image registry.
* pip's configuration on this machine (``pip config list``: index, extra indexes, find-links)
  is passed in as build arguments, and its local folders (``/opt/wheels``, ``file://`` indexes)
  as read-only volumes (podman; docker cannot mount volumes into a build), so CPU torch comes
  from where the Makefile gets it.
* podman runs with ``--runtime runc``, explicit ``--ulimit nofile/nproc`` within the hard
  limits, and ``--network=host`` (what podman needs on these machines; docs/deploy.md).

Prints the images' names and sizes. Tags: ``splitinfer:<version>-onnxruntime`` and
``splitinfer:<version>-torch`` (what tests/integration/deploy and deploy/k8s use).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("onnxruntime", "torch")
SLIM_BASE = "python:3.12-slim-bookworm"
LOCAL_BASE = "localhost/splitinfer-base:bookworm"
#: The local base: Debian's minimal system with python3 and its venv module, without manuals,
#: translations and documentation (copyrights kept), and without the perl that usrmerge pulls
#: in (the merge of /usr is done by then; nothing in the image runs apt). About 100 s.
MMDEBSTRAP = [
    "--variant=minbase",
    "--include=python3,python3-venv",
    *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "locale", "info")),
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    '--customize-hook=chroot "$1" dpkg --purge --force-depends usrmerge libfile-find-rule-perl '
    "libnumber-compare-perl libtext-glob-perl perl libperl5.36 perl-modules-5.36",
    '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
]


def version() -> str:
    text = (ROOT / "splitinfer" / "_version.py").read_text()
    found = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
    if found is None:
        raise SystemExit("image: no __version__ in splitinfer/_version.py")
    return found.group(1)


def image_name(variant: str, tag: str | None = None) -> str:
    return f"splitinfer:{tag or version()}-{variant}"


def find_engine(choice: str | None = None) -> str | None:
    """podman where it is installed, else docker where its daemon answers (a docker client
    alone cannot build), else None."""
    for name in [choice] if choice else ["podman", "docker"]:
        path = shutil.which(name) if name else None
        if path is None:
            continue
        if name == "docker":
            info = subprocess.run([path, "info"], capture_output=True, timeout=20, check=False)
            if info.returncode != 0:
                continue
        return path
    return None


def engine(choice: str | None = None) -> str:
    """:func:`find_engine`, or exit with one line saying what to install."""
    found = find_engine(choice)
    if found is None:
        raise SystemExit("image: needs podman (apt-get install podman runc) or a running docker")
    return found


def run_options(eng: str) -> list[str]:
    """The options every podman build and run needs here (none for docker)."""
    if Path(eng).name != "podman":
        return []
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nofile = 65536 if nofile == resource.RLIM_INFINITY else min(nofile, 65536)
    nproc = 4096 if nproc == resource.RLIM_INFINITY else min(nproc, 4096)
    return [
        "--runtime",
        "runc",
        "--ulimit",
        f"nofile={nofile}:{nofile}",
        "--ulimit",
        f"nproc={nproc}:{nproc}",
        "--network=host",
    ]


def pip_settings() -> tuple[dict[str, str], list[str]]:
    """Build arguments carrying this machine's pip configuration, and the local folders it names."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    )
    found: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        found.setdefault(name, value.strip().strip("'\""))
    names = ("index-url", "extra-index-url", "find-links", "trusted-host", "cert")
    for name in names:
        env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
        if env:
            found[name] = env
    args = {"PIP_" + name.upper().replace("-", "_"): found[name] for name in names if found.get(name)}
    folders: list[str] = []
    for name in ("index-url", "extra-index-url", "find-links"):
        for item in found.get(name, "").split():
            path = Path(item.removeprefix("file://"))
            if not path.is_absolute() or not path.is_dir():
                continue
            # an index's pages may link to files beside its simple/ folder: mount the folder above
            folder = str(path.parent if path.name == "simple" else path)
            if folder not in folders:
                folders.append(folder)
    if Path(found.get("cert", "")).is_file():  # the CA bundle pip trusts here (a proxy's CA, say)
        folders.append(found["cert"])
    return args, folders


def build_base(eng: str) -> str:
    """The local Debian base (mmdebstrap, once per machine; cached as an image)."""
    if subprocess.run([eng, "image", "exists", LOCAL_BASE], check=False).returncode == 0:
        return LOCAL_BASE
    if not shutil.which("mmdebstrap"):
        raise SystemExit("image: --base debian-local needs mmdebstrap (apt-get install mmdebstrap)")
    with tempfile.TemporaryDirectory(prefix="splitinfer-base-") as tmp:
        tar = Path(tmp) / "base.tar"
        subprocess.run(["mmdebstrap", *MMDEBSTRAP, "bookworm", str(tar)], check=True)
        subprocess.run([eng, "import", str(tar), LOCAL_BASE], check=True, stdout=subprocess.DEVNULL)
    return LOCAL_BASE


def size_bytes(eng: str, image: str) -> int:
    done = subprocess.run(
        [eng, "image", "inspect", "--format", "{{json .Size}}", image],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(json.loads(done.stdout.strip()))


def build(eng: str, variant: str, base: str, tag: str | None) -> str:
    image = image_name(variant, tag)
    pip_args, folders = pip_settings()
    cmd = [eng, "build", *run_options(eng), "-f", str(ROOT / "deploy" / "Dockerfile"), "-t", image]
    cmd += ["--build-arg", f"BASE={base}", "--build-arg", f"VARIANT={variant}"]
    if pip_args:  # torch from pip's configured wheels (pinned +cpu), never a bare `torch`
        cmd += ["--build-arg", "TORCH_INDEX_URL="]
        for key, value in pip_args.items():
            cmd += ["--build-arg", f"{key}={value}"]
    if Path(eng).name == "podman":
        cmd += ["--format", "docker"]  # the OCI format has no HEALTHCHECK: podman would drop it
        for folder in folders:
            cmd += ["-v", f"{folder}:{folder}:ro"]
    cmd.append(str(ROOT))
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=[*VARIANTS, "all"], default="all")
    parser.add_argument("--base", default=os.environ.get("SPLITINFER_IMAGE_BASE", SLIM_BASE))
    parser.add_argument("--tag", default=None, help="tag prefix (default: the package version)")
    parser.add_argument("--engine", choices=["podman", "docker"], default=None)
    args = parser.parse_args(argv)
    eng = engine(args.engine)
    base = build_base(eng) if args.base == "debian-local" else args.base
    for variant in VARIANTS if args.variant == "all" else (args.variant,):
        image = build(eng, variant, base, args.tag)
        print(f"{image}: {size_bytes(eng, image) / 2**20:.0f} MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
