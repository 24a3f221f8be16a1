"""The one error tree of charforge.

Every failure a client can see is a ``CharforgeError`` and renders as one JSON envelope::

    {"error": {"code": "...", "message": "...", "field": "...", "hint": "..."}}

    CharforgeError                      500 internal_error
    ├── InvalidInput                    422 validation_error   (names the field)
    ├── Unauthorized                    401 unauthorized
    ├── Forbidden                       403 forbidden
    ├── NotFound                        404 not_found
    ├── Conflict                        409 conflict
    │   └── StyleMismatch               409 style_mismatch
    └── BackendError                    (names the backend and what to check)
        ├── BackendUnavailable          502 backend_unavailable   retriable
        ├── BackendTimeout              504 backend_timeout       retriable
        ├── BackendRejected             502 backend_error         A1111's own message passed on
        ├── BackendBadResponse          502 backend_bad_response  retriable (malformed JSON / image)
        ├── BackendAuthFailed           502 backend_auth_failed
        ├── CheckpointMissing           503 checkpoint_missing
        ├── WrongCheckpoint             502 wrong_checkpoint      the backend ran another model
        └── CheckpointDrift             502 checkpoint_drift      same file name, other weights
"""

from __future__ import annotations

from typing import Any, ClassVar


class CharforgeError(Exception):
    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    retriable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        hint: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.hint = hint
        self.extra = extra or {}

    def to_envelope(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "field": self.field,
            "hint": self.hint,
        }
        body.update(self.extra)
        return {"error": body}


class InvalidInput(CharforgeError):
    code = "validation_error"
    status = 422


class Unauthorized(CharforgeError):
    code = "unauthorized"
    status = 401


class Forbidden(CharforgeError):
    code = "forbidden"
    status = 403


class NotFound(CharforgeError):
    code = "not_found"
    status = 404


class Conflict(CharforgeError):
    code = "conflict"
    status = 409


class StyleMismatch(Conflict):
    code = "style_mismatch"


class BackendError(CharforgeError):
    code = "backend_error"
    status = 502


class BackendUnavailable(BackendError):
    code = "backend_unavailable"
    status = 502
    retriable = True


class BackendTimeout(BackendError):
    code = "backend_timeout"
    status = 504
    retriable = True


class BackendRejected(BackendError):
    code = "backend_error"
    status = 502


class BackendBadResponse(BackendError):
    code = "backend_bad_response"
    status = 502
    retriable = True


class BackendAuthFailed(BackendError):
    code = "backend_auth_failed"
    status = 502


class CheckpointMissing(BackendError):
    code = "checkpoint_missing"
    status = 503


class WrongCheckpoint(BackendError):
    code = "wrong_checkpoint"
    status = 502


class CheckpointDrift(BackendError):
    code = "checkpoint_drift"
    status = 502


_BY_CODE: dict[str, type[CharforgeError]] = {
    cls.code: cls
    for cls in (
        CharforgeError,
        InvalidInput,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        StyleMismatch,
        BackendUnavailable,
        BackendTimeout,
        BackendRejected,
        BackendBadResponse,
        BackendAuthFailed,
        CheckpointMissing,
        WrongCheckpoint,
        CheckpointDrift,
    )
}


def error_from_code(
    code: str, message: str, *, hint: str | None = None, field: str | None = None
) -> CharforgeError:
    """Rebuild a stored error (a failed job keeps only its code, message and hint)."""
    cls = _BY_CODE.get(code, CharforgeError)
    return cls(message, hint=hint, field=field)
