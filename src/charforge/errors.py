"""The one error tree of charforge.

Every failure a client can see is a ``CharforgeError`` and renders as one JSON envelope::

    {"error": {"code": "...", "message": "...", "field": "...", "hint": "..."}}

    CharforgeError                      500 internal_error
    ├── InvalidInput                    422 validation_error   (names the field)
    │   ├── UnsupportedCapability       422 unsupported_capability (names backends + capability)
    │   │   └── IdentityUnavailable     422 unsupported_capability elsewhere (no ControlNet...)
    │   ├── LoraMissing                 422 lora_missing          elsewhere (lists what it has)
    │   ├── UpscalerMissing             422 upscaler_missing      elsewhere (lists what it has)
    │   ├── RestrictedContent           422 restricted_content   (names field and category)
    │   └── ContentWithheld             422 content_withheld     (the image is quarantined)
    ├── Unauthorized                    401 unauthorized
    ├── Forbidden                       403 forbidden
    ├── NotFound                        404 not_found
    ├── Conflict                        409 conflict
    │   └── StyleMismatch               409 style_mismatch
    ├── PayloadTooLarge                 413 payload_too_large
    ├── TooManyRequests                 429 (with Retry-After)
    │   ├── QuotaExceeded               429 quota_exceeded
    │   ├── TooManyJobs                 429 too_many_jobs
    │   └── LoginThrottled              429 too_many_attempts
    └── BackendError                    (names the backend and what to check)
        ├── BackendUnavailable          502 backend_unavailable   retry
        ├── BackendTimeout              504 backend_timeout       retry
        ├── BackendRejected             502 backend_error         A1111's own message passed on;
        │                                                         retry when it was an HTTP 5xx
        ├── BackendBadResponse          502 backend_bad_response  retry (malformed JSON / image)
        ├── BackendInterrupted          502 backend_interrupted   retry (someone stopped the run)
        ├── BackendAuthFailed           502 backend_auth_failed   elsewhere
        ├── CheckpointMissing           503 checkpoint_missing    elsewhere
        ├── WrongCheckpoint             502 wrong_checkpoint      elsewhere (ran another model)
        ├── CheckpointDrift             502 checkpoint_drift      elsewhere (same name, new weights)
        ├── CheckpointUnloadable        502 checkpoint_unloadable elsewhere (a damaged file)
        └── NanProduced                 502 nan_error             elsewhere (needs --no-half)

"retry": the fault may pass, so the job is tried again after a backoff, on another backend of
the pool when there is one. "elsewhere": this backend cannot do it and would fail the same way
again, another one of the pool might, so it is tried only on backends not tried yet.
Everything else fails the job at once.
"""

from __future__ import annotations

from typing import Any, ClassVar


class CharforgeError(Exception):
    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    transient: ClassVar[bool] = False  # may pass: retry, on any backend
    backend_specific: ClassVar[bool] = False  # another backend may succeed: retry elsewhere

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        hint: str | None = None,
        extra: dict[str, Any] | None = None,
        retriable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.hint = hint
        self.extra = extra or {}
        self.retriable = self.transient if retriable is None else retriable

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


class UnsupportedCapability(InvalidInput):
    """The request asks for something no backend of its route can do."""

    code = "unsupported_capability"


class LoraMissing(InvalidInput):
    """A ``<lora:name>`` tag names a LoRA the backend does not have (A1111 would silently
    render without it)."""

    code = "lora_missing"
    backend_specific = True


class UpscalerMissing(InvalidInput):
    """``hiresUpscaler`` names an upscaler the backend does not have (A1111 would fail the
    job with a 500 only after the first pass)."""

    code = "upscaler_missing"
    backend_specific = True


class IdentityUnavailable(UnsupportedCapability):
    """Identity conditioning was asked for and this backend cannot do it (no ControlNet
    extension, no IPAdapter nodes): another backend of the pool may."""

    backend_specific = True


class RestrictedContent(InvalidInput):
    """A text field hits a category of the content policy (the terms are never echoed)."""

    code = "restricted_content"


class ContentWithheld(InvalidInput):
    """A generated image was screened above the NSFW threshold and quarantined."""

    code = "content_withheld"


class ScreeningFailed(CharforgeError):
    """The NSFW classifier could not run: an image is never shown unscreened, nor stored."""

    code = "screening_failed"
    status = 503


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


class PayloadTooLarge(CharforgeError):
    code = "payload_too_large"
    status = 413


class TooManyRequests(CharforgeError):
    """429: answered with Retry-After (``retry_after`` seconds)."""

    code = "too_many_requests"
    status = 429

    def __init__(self, message: str, *, retry_after: float, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = max(1, int(retry_after + 0.999))
        self.extra.setdefault("retryAfter", self.retry_after)


class QuotaExceeded(TooManyRequests):
    code = "quota_exceeded"


class TooManyJobs(TooManyRequests):
    code = "too_many_jobs"


class LoginThrottled(TooManyRequests):
    code = "too_many_attempts"


class StyleMismatch(Conflict):
    code = "style_mismatch"


class BackendError(CharforgeError):
    code = "backend_error"
    status = 502


class BackendUnavailable(BackendError):
    code = "backend_unavailable"
    status = 502
    transient = True


class BackendTimeout(BackendError):
    code = "backend_timeout"
    status = 504
    transient = True


class BackendRejected(BackendError):
    code = "backend_error"
    status = 502


class BackendBadResponse(BackendError):
    code = "backend_bad_response"
    status = 502
    transient = True


class BackendInterrupted(BackendError):
    """The WebUI stopped the run before it was done (its Interrupt or Skip, by anyone): what
    it answered is a half-made picture and is never stored."""

    code = "backend_interrupted"
    status = 502
    transient = True


class BackendAuthFailed(BackendError):
    code = "backend_auth_failed"
    status = 502
    backend_specific = True


class CheckpointMissing(BackendError):
    code = "checkpoint_missing"
    status = 503
    backend_specific = True


class WrongCheckpoint(BackendError):
    code = "wrong_checkpoint"
    status = 502
    backend_specific = True


class CheckpointDrift(BackendError):
    code = "checkpoint_drift"
    status = 502
    backend_specific = True


class CheckpointUnloadable(BackendError):
    """The checkpoint file is there but cannot be loaded (truncated, damaged)."""

    code = "checkpoint_unloadable"
    status = 502
    backend_specific = True


class NanProduced(BackendError):
    """The model produced NaNs: the same prompt and seed fail again on this WebUI until its
    precision settings change."""

    code = "nan_error"
    status = 502
    backend_specific = True


_BY_CODE: dict[str, type[CharforgeError]] = {
    cls.code: cls
    for cls in (
        CharforgeError,
        InvalidInput,
        UnsupportedCapability,
        LoraMissing,
        UpscalerMissing,
        RestrictedContent,
        ContentWithheld,
        ScreeningFailed,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        StyleMismatch,
        BackendUnavailable,
        BackendTimeout,
        BackendRejected,
        BackendBadResponse,
        BackendInterrupted,
        BackendAuthFailed,
        CheckpointMissing,
        WrongCheckpoint,
        CheckpointDrift,
        CheckpointUnloadable,
        NanProduced,
    )
}


def error_from_code(
    code: str, message: str, *, hint: str | None = None, field: str | None = None
) -> CharforgeError:
    """Rebuild a stored error (a failed job keeps only its code, message and hint)."""
    cls = _BY_CODE.get(code, CharforgeError)
    return cls(message, hint=hint, field=field)
