"""The parts an EdgeClient is made of, built from its settings (checked here, once)."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from splitinfer.bundle import Bundle
from splitinfer.compression import get_codec
from splitinfer.edge._config import ClientConfig
from splitinfer.edge._transport import HttpTransport, make_ssl_context
from splitinfer.errors import CodecError, ConfigError
from splitinfer.manifest import Manifest
from splitinfer.partitioner import Estimates, Estimator, Policy, make_policy

__all__ = [
    "http_transport",
    "load_bundle",
    "make_client_policy",
    "make_estimator",
    "max_cut",
    "warn_unencodable",
]

log = logging.getLogger("splitinfer.edge")


def load_bundle(bundle: str | os.PathLike[str] | Bundle, max_cut: int | None, runtime: str | None) -> Bundle:
    """``bundle`` itself, or the bundle saved there with the segments up to ``max_cut``, on
    ``runtime`` (``auto``: ONNX Runtime when the bundle has ONNX and onnxruntime imports;
    None: torch when it is installed, else auto)."""
    if not isinstance(bundle, Bundle):
        if runtime is None:
            runtime = "torch" if _torch_installed() else "auto"
        return Bundle.load(Path(bundle), upto_cut=max_cut, runtime=runtime)
    if runtime not in (None, "auto", bundle.runtime):
        raise ConfigError(
            f"this bundle object runs on {bundle.runtime}; for runtime={runtime!r} pass its directory, "
            f"or Bundle.load(path, runtime={runtime!r})"
        )
    return bundle


def _torch_installed() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except ImportError:  # a finder that refuses torch (tests/test_layering.py's BLOCK_TORCH)
        return False


def max_cut(bundle: Bundle, limit: int | None) -> int:
    """The deepest cut a client may choose (default: the last); ConfigError if its head is
    not loaded."""
    k = bundle.last_cut if limit is None else bundle.cut(limit).index
    if not bundle.can_head(k):
        raise ConfigError(f"the bundle holds no head for cut {k}; load it with upto_cut >= it")
    return k


def make_client_policy(policy: str | Policy, bundle: Bundle, config: ClientConfig) -> Policy:
    """``policy`` itself, or the named one made for ``bundle`` with the config's options (and
    its fidelity budget, for the policies that have one). ConfigError for keywords that are
    neither a setting nor an option of the named policy."""
    options = dict(config.policy_options)
    if not isinstance(policy, str):
        if options:
            raise ConfigError(
                f"unknown keyword(s) {', '.join(sorted(options))}: they are neither EdgeClient settings "
                f"({', '.join(ClientConfig.settings())}) nor options of a named policy; a Policy object "
                "takes no options (pass policy='adaptive', ... with them, or fix the name)"
            )
        return policy
    if policy in ("adaptive", "cloud"):
        options.setdefault("fidelity_budget", config.fidelity_budget)
    if policy == "adaptive" and not (config.hedge and bundle.can_head(bundle.last_cut)):
        options.setdefault("hedge", False)  # a client that does not hedge: never price a hedge
    return make_policy(policy, bundle, **options)


def make_estimator(bundle: Bundle, config: ClientConfig) -> Estimator:
    """An estimator starting from the config's prior, on an N-times-slower device."""
    prior = config.prior or Estimates(uplink_bps=2e6, downlink_bps=8e6, rtt_s=0.05)
    return Estimator(
        bundle, prior=replace(prior, device_slowdown=float(config.device_slowdown)), clock=time.perf_counter
    )


def http_transport(url: str, config: ClientConfig) -> HttpTransport:
    """The HTTP transport to ``url``, with TLS when the config names a CA or client certificate."""
    tls = config.ca_file or config.client_cert
    ssl_context = make_ssl_context(config.ca_file, config.client_cert, config.client_key) if tls else None
    return HttpTransport(url, token=config.token, ssl_context=ssl_context)


def unencodable(bundles: tuple[Manifest, ...]) -> dict[str, str]:
    """The offered codecs this environment cannot encode, each with why (the install line)."""
    missing: dict[str, str] = {}
    for spec in sorted({c for b in bundles for c in b.codecs}):
        try:
            get_codec(spec)
        except CodecError as exc:
            missing[spec] = str(exc)
    return missing


def warn_unencodable(bundles: tuple[Manifest, ...]) -> dict[str, str]:
    """Log once which offered codecs this environment cannot encode (no policy chooses them)."""
    missing = unencodable(bundles)
    if missing:
        log.warning(
            "model %r offers codecs this environment cannot encode, so no request uses them: %s",
            bundles[0].name,
            "; ".join(f"{spec}: {why}" for spec, why in missing.items()),
        )
    return missing
