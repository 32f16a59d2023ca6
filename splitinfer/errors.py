"""The one exception tree of splitinfer.

Every error the package raises on purpose is a :class:`SplitInferError`, and each class also
inherits the builtin it resembles, so callers can catch either::

    SplitInferError(Exception)
    ├── ConfigError(ValueError)            an option or argument is wrong; the message says how to fix it
    ├── CaptureError(RuntimeError)         torch.export could not capture the model
    ├── BundleError(ValueError)            a bundle on disk is missing, tampered with or inconsistent
    │   └── CutNotLoadedError(LookupError) a cut outside the segments this process loaded
    ├── CodecError(ValueError)             a codec spec is unknown, or a blob cannot be decoded safely
    ├── ClientClosedError(RuntimeError)    an EdgeClient used after close()
    ├── ProtocolError(ValueError)          a wire frame is malformed              400 malformed_frame
    │   ├── FrameTooLargeError             a frame or payload exceeds a limit     413 too_large
    │   └── UnsupportedVersionError        a frame speaks another version         400 unsupported_version
    └── CloudError                         the cloud answered with an error, or not at all
        ├── CloudUnavailableError(ConnectionError)   unreachable, or shedding load (503)
        ├── CloudTimeoutError(TimeoutError)          no answer within the deadline (or 504)
        ├── AuthError(PermissionError)               401/403: missing or wrong token
        ├── GraphMismatchError                       409: edge and cloud hold different graphs
        ├── TLSError(OSError)                        TLS failed: an untrusted certificate, or TLS
        │                                            spoken where http:// was given
        └── RemoteRequestError(ValueError)           any other 4xx: the request itself was wrong

Errors of aiohttp, msgpack, zstandard and torch are translated at the boundary with
``raise Mapped(message) from exc``; they never reach a user untranslated.

A :class:`CloudError` carries the problem+json ``code`` and HTTP ``status`` that the server sent
(both ``None`` when no answer came back).
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BundleError",
    "CaptureError",
    "ClientClosedError",
    "CloudError",
    "CloudTimeoutError",
    "CloudUnavailableError",
    "CodecError",
    "ConfigError",
    "CutNotLoadedError",
    "FrameTooLargeError",
    "GraphMismatchError",
    "ProtocolError",
    "RemoteRequestError",
    "SplitInferError",
    "TLSError",
    "UnsupportedVersionError",
]


class SplitInferError(Exception):
    """Base of every error splitinfer raises on purpose."""


class ConfigError(SplitInferError, ValueError):
    """An option, argument or configuration value is invalid."""


class CaptureError(SplitInferError, RuntimeError):
    """torch.export could not capture the model; the message names the construct."""


class BundleError(SplitInferError, ValueError):
    """A bundle directory is missing files, was tampered with, or is inconsistent."""


class CutNotLoadedError(BundleError, LookupError):
    """The requested cut needs segments this process did not load."""


class CodecError(SplitInferError, ValueError):
    """A codec spec is invalid, or an encoded blob is truncated, corrupt or hostile."""


class ClientClosedError(SplitInferError, RuntimeError):
    """An EdgeClient was used after it was closed (it never quietly reopens)."""


class ProtocolError(SplitInferError, ValueError):
    """A wire frame is malformed. ``code`` is the stable problem+json code it maps to."""

    code = "malformed_frame"
    status = 400


class FrameTooLargeError(ProtocolError):
    """A frame, header or payload exceeds its size limit."""

    code = "too_large"
    status = 413


class UnsupportedVersionError(ProtocolError):
    """A frame speaks a protocol version this side does not."""

    code = "unsupported_version"
    status = 400


class CloudError(SplitInferError):
    """The cloud answered with an error, or did not answer."""

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.status = status


class CloudUnavailableError(CloudError, ConnectionError):
    """The cloud is unreachable, or shed the request (503)."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message, code=code, status=status)
        self.retry_after_s = retry_after_s


class CloudTimeoutError(CloudError, TimeoutError):
    """The cloud did not answer within the deadline, or its queue outlived it (504)."""


class AuthError(CloudError, PermissionError):
    """The cloud refused the credentials (401 or 403)."""


class GraphMismatchError(CloudError):
    """The cloud hosts a different graph for this model than the edge holds (409)."""


class TLSError(CloudError, OSError):
    """TLS between the edge and the cloud failed: configuration, not an outage (the message
    says how to fix it: ``ca_file=``, or ``https://``)."""


class RemoteRequestError(CloudError, ValueError):
    """The cloud rejected the request as malformed or unservable (another 4xx)."""
