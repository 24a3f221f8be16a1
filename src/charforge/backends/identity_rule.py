"""The one rule every adapter follows when it cannot condition on reference images."""

from __future__ import annotations

from charforge.backends.base import BackendRequest, IdentityUse
from charforge.domain.capabilities import Capability
from charforge.errors import IdentityUnavailable


def asked(request: BackendRequest) -> bool:
    """Conditioning is wanted: references to use, at a strength above 0."""
    return bool(request.references) and request.params.identity_strength > 0


def without(request: BackendRequest, backend: str, why: str, *, hint: str) -> IdentityUse:
    """Identity asked for explicitly is refused here (another backend of the pool may have
    it); asked for by default, the image is made without it and says why."""
    if request.params.identity_required:
        raise IdentityUnavailable(
            f"Backend '{backend}' cannot condition on reference images: {why}.",
            field="identity",
            hint=hint,
            extra={"capability": Capability.REFERENCE_IMAGE.value, "backends": [backend]},
        )
    return IdentityUse(False, reason=f"backend '{backend}': {why}")
