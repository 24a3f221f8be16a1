"""Reading one uploaded file from a multipart form, bounded: at most one file and a few fields,
and never more than one byte past the size limit (enough to know it is too big)."""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import (
    UploadFile,
)  # what request.form() gives (FastAPI's subclasses it)

from charforge.errors import InvalidInput


async def form_file(
    request: Request, limit: int, *, fields: tuple[str, ...] | None = (), hint: str | None = None
) -> tuple[dict[str, str], bytes | None]:
    """The form's text fields and at most ``limit + 1`` bytes of its field ``file`` (None: no
    file chosen). ``fields``: the text fields it may have besides ``file``, any other is
    refused; None takes any (a page's form)."""
    form = await request.form(max_files=1, max_fields=4 if fields is None else len(fields) + 1)
    try:
        if fields is not None:
            unknown = sorted(k for k in form if k != "file" and k not in fields)
            if unknown:
                raise InvalidInput(
                    f"Unknown form field(s): {', '.join(unknown)}.", field=unknown[0], hint=hint
                )
        texts = {k: v for k, v in form.items() if isinstance(v, str)}
        upload = form.get("file")
        if not isinstance(upload, UploadFile) or (fields is None and not upload.filename):
            return texts, None
        return texts, await upload.read(limit + 1)
    finally:
        await form.close()
