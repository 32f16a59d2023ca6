"""ClientConfig: the settings of an EdgeClient, checked when built (STYLE.md item 8)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from splitinfer._checks import check_number
from splitinfer.errors import ConfigError
from splitinfer.partitioner import Estimates
from splitinfer.runtime import RUNTIMES

__all__ = ["ClientConfig"]


@dataclass(frozen=True)
class ClientConfig:
    """How an :class:`~splitinfer.edge.EdgeClient` decides and reaches the cloud.

    ``EdgeClient(url, bundle=..., deadline_s=2.0, cut=3, ...)`` builds one from its keywords;
    ``EdgeClient(url, bundle=..., config=ClientConfig(...))`` takes one whole (keywords given
    as well override its fields). The EdgeClient docstring says what each setting does.
    """

    #: Seconds a request may take before it stays on the device (and the cloud is told the rest).
    deadline_s: float | None = 1.0
    #: The device is this many times slower than this machine (>= 1; an emulation).
    device_slowdown: float = 1.0
    #: Least fidelity of a (cut, codec) for the ``adaptive`` and ``cloud`` policies.
    fidelity_budget: float = 0.99
    #: The deepest cut this client may choose, and so the segments it loads (None: all).
    max_cut: int | None = None
    #: The bearer token the cloud asks for.
    token: str | None = field(default=None, repr=False)
    #: TLS: the CA bundle to trust, and a client certificate and key for mutual TLS.
    ca_file: str | os.PathLike[str] | None = None
    client_cert: str | os.PathLike[str] | None = None
    client_key: str | os.PathLike[str] | None = None
    #: What the estimator believes before its first observation (device_slowdown is set from
    #: ``device_slowdown``); None: a 2 Mbit/s uplink, 8 Mbit/s downlink and 50 ms round trip.
    prior: Estimates | None = None
    #: Probe the link when estimates are stale; None: unless the policy is static or local.
    probe: bool | None = None
    #: Finish an overdue sent request on the device (hedged requests; needs the whole model).
    hedge: bool = True
    #: How ``device_slowdown`` is emulated: ``measured`` scales the time the work took on this
    #: host; ``profile`` waits out the profiled time times the slowdown (at least the time the
    #: work took), so that contention on a shared host is not multiplied into device time.
    emulate: str = "measured"
    #: Where the head and the fallback run: ``auto`` (ONNX Runtime when the bundle has an ONNX
    #: graph and onnxruntime imports, else torch), ``onnxruntime`` or ``torch``; None: torch
    #: where torch is installed (outputs bitwise as before), else ``auto`` (docs/runtimes.md).
    runtime: str | None = None
    #: Settings for :func:`~splitinfer.partitioner.make_policy` (``cut=``, ``codec=``, ...).
    policy_options: Mapping[str, object] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.deadline_s is not None:
            check_number(
                "deadline_s (None: no deadline)", self.deadline_s, lo=0.0, lo_open=True, unit="seconds"
            )
        check_number("device_slowdown (1 = this machine)", self.device_slowdown, lo=1.0)
        check_number("fidelity_budget", self.fidelity_budget, lo=0.0, hi=1.0)
        if self.max_cut is not None and (not isinstance(self.max_cut, int) or isinstance(self.max_cut, bool)):
            raise ConfigError(f"max_cut must be a cut index (int) or None, got {self.max_cut!r}")
        if self.token is not None and not isinstance(self.token, str):
            raise ConfigError(f"token must be a string or None, got a {type(self.token).__name__}")
        for name in ("ca_file", "client_cert", "client_key"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str | os.PathLike):
                raise ConfigError(f"{name} must be a file path or None, got a {type(value).__name__}")
        if self.prior is not None and not isinstance(self.prior, Estimates):
            raise ConfigError(
                f"prior must be a splitinfer.partitioner.Estimates or None, got {type(self.prior).__name__}"
            )
        if self.emulate not in ("measured", "profile"):
            raise ConfigError(f"emulate must be 'measured' or 'profile', got {self.emulate!r}")
        if not isinstance(self.hedge, bool):
            raise ConfigError(f"hedge must be True or False, got {self.hedge!r}")
        if self.probe is not None and not isinstance(self.probe, bool):
            raise ConfigError(f"probe must be True, False or None (the policy decides), got {self.probe!r}")
        if self.runtime is not None and self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if not isinstance(self.policy_options, Mapping):
            raise ConfigError(f"policy_options must be a mapping, got {type(self.policy_options).__name__}")
        object.__setattr__(self, "policy_options", dict(self.policy_options))  # a copy of its own

    @classmethod
    def build(cls, config: ClientConfig | None, keywords: Mapping[str, Any]) -> ClientConfig:
        """``config`` (default: the defaults) with ``keywords`` applied: those naming a field
        set it, the others are policy options (added to ``config.policy_options``). The values
        are the caller's keywords, of any type until ``__post_init__`` has checked them."""
        if config is not None and not isinstance(config, ClientConfig):
            raise ConfigError(f"config must be a ClientConfig, got {type(config).__name__}")
        base = cls() if config is None else config
        if not keywords:
            return base
        names = _SETTINGS
        own = {k: v for k, v in keywords.items() if k in names}
        policy = {k: v for k, v in keywords.items() if k not in names}
        return dataclasses.replace(base, **own, policy_options={**base.policy_options, **policy})

    @staticmethod
    def settings() -> tuple[str, ...]:
        """The names a keyword may set (the others are policy options)."""
        return tuple(sorted(_SETTINGS))


#: The fields a keyword may set (policy_options is given whole, or as the other keywords).
_SETTINGS = frozenset(f.name for f in dataclasses.fields(ClientConfig)) - {"policy_options"}
