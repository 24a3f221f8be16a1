"""Liveness, readiness and metrics for load balancers and Prometheus (no token needed)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from charforge import __version__
from charforge.api.deps import ContainerDep
from charforge.container import Container

router = APIRouter(tags=["health"])


@router.get("/healthz")
@router.get("/api/health")
def health(c: ContainerDep) -> dict[str, object]:
    """The process is up (it answers); says nothing about what it depends on."""
    return {"status": "ok", "version": __version__, "simulated": c.settings.demo}


@router.get("/readyz", responses={503: {"description": "Not ready; `checks` says why"}})
async def ready(c: ContainerDep) -> JSONResponse:
    """Ready to take work: database reachable, broker reachable (distributed mode), and at
    least one healthy backend for every route."""
    checks = await run_in_threadpool(readiness, c)
    ok = all(check["ok"] for check in checks.values())
    return JSONResponse(
        {"status": "ready" if ok else "not_ready", "checks": checks},
        status_code=200 if ok else 503,
    )


def readiness(c: Container) -> dict[str, dict[str, Any]]:
    checks: dict[str, dict[str, Any]] = {}
    try:
        with c.db.session() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = {"ok": True}
    except Exception as exc:  # any failure to reach it is the answer
        checks["database"] = {
            "ok": False,
            "error": type(exc).__name__,
            "hint": "Check CHARFORGE_DATABASE_URL and that the database server is running.",
        }
    if c.settings.broker_url:
        checks["broker"] = _broker_check(c.settings.broker_url)
        if checks["broker"]["ok"]:
            checks["workers"] = workers_check(c)
    probes = c.pool.probe(list(c.pool.backends))  # fresh enough (cached a few seconds)
    healthy = {s.name for s in c.pool.statuses() if s.healthy and probes[s.name].ok}
    for style, route in sorted(c.table.routes.items()):
        up = [name for name in route.backends if name in healthy]
        check: dict[str, Any] = {"ok": bool(up), "healthy": up, "backends": list(route.backends)}
        if not up:
            check["hint"] = (
                f"No backend of the {style} route answers; run `charforge backends` to see why."
            )
        checks[f"route:{style}"] = check
    return checks


def workers_check(c: Container) -> dict[str, Any]:
    """Distributed mode: every queue a server sends to has a live worker (heartbeats in
    Redis), else its jobs would wait for ever with nothing to say why."""
    from redis.exceptions import RedisError

    from charforge.jobs.celery_queue import unserved_queues
    from charforge.jobs.heartbeat import live_workers

    assert c.settings.broker_url is not None
    try:
        workers = live_workers(c.settings.broker_url)
    except RedisError as exc:
        return {"ok": False, "error": type(exc).__name__, "hint": "Check CHARFORGE_BROKER_URL."}
    missing = unserved_queues(c.table, workers)
    check: dict[str, Any] = {
        "ok": not missing,
        "live": [{"worker": w.worker, "host": w.host, "queues": list(w.queues)} for w in workers],
    }
    if missing:
        named = "; ".join(
            f"{queue} ({', '.join(styles) if styles else 'characters with their own model'})"
            for queue, styles in missing.items()
        )
        check["error"] = f"no live worker consumes {named}"
        check["hint"] = (
            "Start `charforge worker` (every queue) or one with --checkpoints for each missing "
            "queue; their jobs wait queued until one does."
        )
    return check


def _broker_check(url: str) -> dict[str, Any]:
    from redis import Redis
    from redis.exceptions import RedisError

    client: Redis = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
        return {"ok": True}
    except RedisError as exc:
        return {
            "ok": False,
            "error": type(exc).__name__,
            "hint": "Check CHARFORGE_BROKER_URL and that Redis is running.",
        }
    finally:
        client.close()


@router.get("/metrics", response_class=Response)
async def metrics(c: ContainerDep) -> Response:
    body = await run_in_threadpool(_metrics_text, c)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _metrics_text(c: Container) -> bytes:
    """This process's metrics; in distributed mode, every live worker's too, labelled."""
    own = c.metrics.render()
    if not c.settings.broker_url:
        return own
    from charforge.observability import fleet_metrics

    workers = fleet_metrics.gather(c.settings.broker_url)
    return fleet_metrics.merge(own, workers) if workers else own
