import pytest

from splitinfer import errors


def test_every_error_is_a_splitinfer_error_and_its_builtin():
    pairs = {
        errors.ConfigError: ValueError,
        errors.CaptureError: RuntimeError,
        errors.BundleError: ValueError,
        errors.CutNotLoadedError: LookupError,
        errors.CodecError: ValueError,
        errors.ClientClosedError: RuntimeError,
        errors.ProtocolError: ValueError,
        errors.FrameTooLargeError: ValueError,
        errors.UnsupportedVersionError: ValueError,
        errors.CloudUnavailableError: ConnectionError,
        errors.CloudTimeoutError: TimeoutError,
        errors.AuthError: PermissionError,
        errors.RemoteRequestError: ValueError,
    }
    for cls, builtin in pairs.items():
        assert issubclass(cls, errors.SplitInferError), cls
        assert issubclass(cls, builtin), cls


def test_every_class_in_the_module_is_drawn_in_its_docstring():
    doc = errors.__doc__
    assert doc is not None
    for name in errors.__all__:
        assert name in doc, f"{name} is missing from the tree in errors.py's docstring"


def test_cloud_errors_carry_code_and_status():
    exc = errors.CloudUnavailableError("shed", code="overloaded", status=503, retry_after_s=2.0)
    assert (exc.code, exc.status, exc.retry_after_s) == ("overloaded", 503, 2.0)
    with pytest.raises(ConnectionError):
        raise exc
