"""``POST /api/batches``: many generations as one request. The body carries the generation
fields shared by every item (any field of the generate body but the prompt) and 1..200 items,
whose own fields win. Each item becomes a generate body of its own, checked before anything
is queued; its errors name it (``items[3].sampler``)."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo

from charforge.domain.params import COUNT_MAX, PROMPT_MAX, SEED_MAX, GenerateBody
from charforge.errors import InvalidInput

ITEMS_MAX = 200
# What only an item says: its prompt. Everything else of the generate body may be shared.
_ITEM_ONLY = ("prompt",)


class BatchItem(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", str_strip_whitespace=True
    )

    prompt: str | None = Field(default=None, min_length=1, max_length=PROMPT_MAX)
    negative_prompt: str | None = Field(default=None, max_length=PROMPT_MAX)
    character_id: str | None = Field(default=None, min_length=1, max_length=64)
    seed: int | None = Field(default=None, ge=-1, le=SEED_MAX)
    count: int | None = Field(default=None, ge=1, le=COUNT_MAX)
    template_id: str | None = Field(default=None, min_length=1, max_length=64)
    variables: dict[str, str] | None = None


def _shared_fields() -> dict[str, Any]:
    """The generate body's fields, each optional (absent: the item's or the default), with
    their limits kept, so a shared value out of range is refused once, naming it."""
    fields: dict[str, Any] = {}
    for name, info in GenerateBody.model_fields.items():
        if name in _ITEM_ONLY:
            continue
        optional = FieldInfo.merge_field_infos(info, default=None)
        fields[name] = (Optional[info.annotation], optional)  # noqa: UP045 - a runtime type
    return fields


BatchShared: type[BaseModel] = create_model(
    "BatchShared",
    __config__=ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", str_strip_whitespace=True
    ),
    **_shared_fields(),
)


class BatchBody(BatchShared):
    """The shared generation fields plus the items."""

    items: list[BatchItem] = Field(min_length=1, max_length=ITEMS_MAX)


def item_bodies(body: BaseModel) -> list[GenerateBody]:
    """One generate body per item: the shared fields, then the item's own over them."""
    shared = body.model_dump(exclude_unset=True, exclude={"items"})
    out = []
    for index, item in enumerate(getattr(body, "items")):  # noqa: B009 - a dynamic model
        merged = {**shared, **item.model_dump(exclude_unset=True)}
        where = f"items[{index}]"
        if not merged.get("character_id"):
            raise InvalidInput(
                f"{where} names no character.",
                field=f"{where}.characterId",
                hint="Send characterId on the batch (for every item) or on the item.",
            )
        if not merged.get("prompt") and not merged.get("template_id"):
            raise InvalidInput(
                f"{where} has no prompt.",
                field=f"{where}.prompt",
                hint="Give each item a prompt (or a templateId with its variables).",
            )
        try:
            out.append(GenerateBody.model_validate(merged))
        except ValidationError as exc:
            first = exc.errors()[0]
            name = ".".join(to_camel(str(p)) for p in first["loc"])
            raise InvalidInput(
                f"{where}.{name}: {first['msg']}.",
                field=f"{where}.{name}",
                hint="Fix that item (or the shared field it took) and send the batch again.",
            ) from exc
    return out
