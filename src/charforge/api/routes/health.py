"""Liveness, and a landing page that says what this server is."""

from __future__ import annotations

from html import escape

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from charforge import __version__
from charforge.api.deps import ContainerDep

router = APIRouter(tags=["health"])

DEMO_BANNER = (
    "DEMO MODE: images come from the built-in A1111 simulator and are labelled placeholders, "
    "not real generations."
)


@router.get("/healthz")
@router.get("/api/health")
def health(c: ContainerDep) -> dict[str, object]:
    return {"status": "ok", "version": __version__, "simulated": c.settings.demo}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def landing(c: ContainerDep) -> HTMLResponse:
    banner = (
        f'<p role="alert" style="background:#ffe08a;padding:.75em;border-radius:6px">'
        f"{escape(DEMO_BANNER)}</p>"
        if c.settings.demo
        else ""
    )
    styles = "".join(
        f"<li>{escape(r.indicator)} — backend {escape(', '.join(r.backends))}</li>"
        for r in c.table.routes.values()
    )
    return HTMLResponse(
        f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1"><title>charforge</title></head>
<body style="font-family:system-ui,sans-serif;max-width:46em;margin:2em auto;padding:0 1em">
{banner}<h1>charforge {escape(__version__)}</h1>
<p>Characters that keep their look: every image of a character is made with the checkpoint
that created it.</p><h2>Styles</h2><ul>{styles}</ul>
<p>API reference: <a href="/docs">/docs</a>. API calls need <code>Authorization: Bearer TOKEN</code>
(<code>charforge tokens create NAME</code>).</p></body></html>"""
    )
