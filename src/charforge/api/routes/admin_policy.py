"""/api/admin/content-policy: what the content policy holds, and reloading it from its file."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter

from charforge.api.deps import AdminUser, ContainerDep
from charforge.api.openapi_errors import ErrorEnvelope
from charforge.api.schemas import Wire
from charforge.errors import InvalidInput
from charforge.safety import ENV_VAR, ContentPolicy, PolicyError

router = APIRouter(prefix="/api/admin/content-policy", tags=["admin"])


class CategoryOut(Wire):
    name: str
    description: str
    enabled: bool
    builtin: bool
    term_count: int
    pattern_count: int
    # Admins manage the file, so they may read what it holds (users never see terms).
    terms: list[str]
    patterns: list[str]


class ContentPolicyOut(Wire):
    path: str | None
    loaded_at: datetime
    categories: list[CategoryOut]

    @classmethod
    def of(cls, policy: ContentPolicy) -> ContentPolicyOut:
        return cls(
            path=str(policy.path) if policy.path else None,
            loaded_at=policy.loaded_at.replace(tzinfo=None),  # Wire writes UTC with a Z
            categories=[
                CategoryOut(
                    name=c.name,
                    description=c.description,
                    enabled=c.enabled,
                    builtin=c.builtin,
                    term_count=len(c.terms),
                    pattern_count=len(c.patterns),
                    terms=list(c.terms),
                    patterns=list(c.patterns),
                )
                for c in policy.categories.values()
            ],
        )


@router.get("", response_model=ContentPolicyOut)
def read_policy(_admin: AdminUser, c: ContainerDep) -> ContentPolicyOut:
    return ContentPolicyOut.of(c.policy.current)


_BROKEN: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorEnvelope, "description": "The file is broken; the previous policy stays"}
}


@router.post("/reload", response_model=ContentPolicyOut, responses=_BROKEN)
def reload_policy(_admin: AdminUser, c: ContainerDep) -> ContentPolicyOut:
    """Read the file again. A broken file is refused and the policy in force stays."""
    try:
        policy = c.policy.reload()
    except PolicyError as exc:
        raise InvalidInput(
            f"The content policy file was not loaded: {exc}. The previous policy stays in force.",
            field=ENV_VAR,
            hint="Fix the file and reload again.",
        ) from exc
    return ContentPolicyOut.of(policy)
