"""One error type for the request path, carrying a gRPC status code and its HTTP equivalent."""

from __future__ import annotations

import grpc

from tfx_xmatch.user_errors import clean_tf_message

# TF Serving's REST front-end maps canonical codes to HTTP statuses along these lines.
_HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

# grpc.StatusCode values are (int, name) pairs; TF's error codes use the same integers.
_BY_INT = {code.value[0]: code for code in grpc.StatusCode}


def status_code_from_int(value: int) -> grpc.StatusCode:
    return _BY_INT.get(int(value), grpc.StatusCode.UNKNOWN)


def http_status(code: grpc.StatusCode) -> int:
    return _HTTP_STATUS.get(code, 500)


class ServingError(Exception):
    """A request failure to report to the client (never a server crash)."""

    def __init__(self, code: grpc.StatusCode, message: str, http: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.http = http if http is not None else http_status(code)

    def __repr__(self) -> str:
        return f"ServingError({self.code.name}, {self.message!r})"


def invalid_argument(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def unimplemented(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.UNIMPLEMENTED, message)


def from_exception(exc: BaseException) -> ServingError:
    """Translates an exception raised while running a model into a ServingError.

    TensorFlow's ``OpError`` subclasses carry canonical codes (``InvalidArgumentError`` from a
    failing ``tf.debugging.assert_*`` becomes INVALID_ARGUMENT) and keep their message.
    """
    if isinstance(exc, ServingError):
        return exc
    try:
        import tensorflow as tf

        if isinstance(exc, tf.errors.OpError):
            return ServingError(status_code_from_int(exc.error_code), clean_tf_message(exc.message))
    except ImportError:  # pragma: no cover - TF is always there in practice
        pass
    raw = getattr(exc, "object", None)
    if isinstance(exc, UnicodeDecodeError) and isinstance(raw, bytes) and b"[Op:" in raw:
        # TensorFlow's own error, whose message quotes request bytes that are not UTF-8 (an
        # unknown id): its Python binding failed to decode it, losing the code. Only a
        # request's data puts such bytes there, hence INVALID_ARGUMENT.
        return invalid_argument(clean_tf_message(raw.decode("utf-8", "backslashreplace")))
    if isinstance(exc, (ValueError, TypeError)):
        return invalid_argument(f"{type(exc).__name__}: {exc}")
    return ServingError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
