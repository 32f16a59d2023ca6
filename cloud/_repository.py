"""The model repository: one bundle per subdirectory."""

from __future__ import annotations

from pathlib import Path

from splitinfer.bundle import MANIFEST, Bundle
from splitinfer.errors import BundleError

__all__ = ["load_repository"]


def load_repository(root: Path) -> dict[str, Bundle]:
    """Every bundle under ``root``, by model name; a broken bundle stops the start, loudly."""
    models: dict[str, Bundle] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (sub / MANIFEST).exists():
            continue
        bundle = Bundle.load(sub)
        if bundle.name in models:
            raise BundleError(f"two bundles in {root} are named {bundle.name!r}; rename one")
        models[bundle.name] = bundle
    if not models:
        raise BundleError(f"no bundle in {root}: put one bundle directory (with {MANIFEST}) per subdirectory")
    return models
