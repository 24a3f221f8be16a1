"""What the workers of a fleet share in Redis to schedule as one: the backends' slots, what
each backend has (or is about to have) loaded, when each user was last served, a short lock
so that one worker plans at a time, and a channel that wakes every worker's scheduler when a
slot frees up.

Redis is the broker already; nothing here is a queue: the jobs themselves are rows in the
database (db/dispatch.py), and every key here can vanish without losing work (slots have a
time to live, the rest only steers the plan).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

_PLANNED = "charforge:fleet:planned"  # hash: backend key -> checkpoint given to it last
_SERVED = "charforge:fleet:served"  # hash: user id -> when a job of theirs was last taken
_LOCK = "charforge:fleet:plan-lock"
CHANNEL = "charforge:fleet:wake"
FREED, TOOK, CHANGED = "freed", "took", "changed"  # what a wake-up says happened


class RedisSlots:
    """Per-backend slots shared by every worker: keys with a TTL, renewed while a job runs, so
    a killed worker's slot frees itself."""

    # Only the holder may extend or free a slot (compare-and-act, atomically in Redis).
    _RENEW = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then "
        "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
    )
    _RELEASE = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then "
        "return redis.call('del', KEYS[1]) end return 0"
    )

    def __init__(self, url: str, ttl: float, owner: str) -> None:
        # Bounded: a hung Redis must fail a call, not block a job's thread for ever.
        self._redis: Redis = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        self._ttl_ms = int(ttl * 1000)
        # Each value names the worker holding it, so a dead worker's slots can be freed as
        # soon as its heartbeat is gone rather than when their time to live ends.
        self._owner = owner

    @staticmethod
    def key(backend: str, slot: int) -> str:
        return f"charforge:slot:{backend}:{slot}"

    def acquire(self, backend: str, limit: int) -> str | None:
        token = f"{self._owner}|{uuid.uuid4().hex}"
        for slot in range(limit):
            if self._redis.set(self.key(backend, slot), token, nx=True, px=self._ttl_ms):
                return f"{slot}:{token}"
        return None

    def renew(self, backend: str, token: str) -> None:
        slot, value = token.split(":", 1)
        self._redis.eval(self._RENEW, 1, self.key(backend, int(slot)), value, self._ttl_ms)

    def release(self, backend: str, token: str) -> None:
        slot, value = token.split(":", 1)
        self._redis.eval(self._RELEASE, 1, self.key(backend, int(slot)), value)

    def free_dead(self, live: set[str]) -> int:
        """Free every slot (and door) held by a worker not in ``live``; returns how many."""
        freed = 0
        for key in self._redis.scan_iter(match="charforge:slot:*", count=200):
            value = self._redis.get(key)
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            if not text or "|" not in text:
                continue  # gone meanwhile, or a value from before owners were recorded
            if text.split("|", 1)[0] not in live:
                freed += int(self._redis.eval(self._RELEASE, 1, key, text) or 0)
        return freed

    @staticmethod
    def loaded_key(backend: str) -> str:
        return f"charforge:loaded:{backend}"

    def swap_loaded(self, backend: str, checkpoint: str) -> str | None:
        previous = self._redis.getset(self.loaded_key(backend), checkpoint)
        return None if previous is None else _text(previous)

    def forget_loaded(self, backend: str) -> None:
        """Its last load failed: what it has loaded is unknown until it renders again."""
        self._redis.delete(self.loaded_key(backend))

    def close(self) -> None:
        self._redis.close()


@dataclass(frozen=True)
class Snapshot:
    held: dict[str, int]  # backend key -> slots held by anyone
    planned: dict[str, str]  # backend key -> checkpoint it was last given
    loaded: dict[str, str]  # backend key -> checkpoint it last rendered with
    served: dict[int, float]  # user id -> when a job of theirs was last taken
    # worker id -> slots it holds, whatever the backend (each is a job it runs)
    held_by: Counter[str] = field(default_factory=Counter)


class FleetBoard:
    """The shared part of the scheduler's view; see the module's docstring."""

    _UNLOCK = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then "
        "return redis.call('del', KEYS[1]) end return 0"
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self._redis: Redis = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)

    def look(self, limits: dict[str, int]) -> Snapshot:
        """The fleet's state for a plan, in one round trip: the slots held on each backend
        (by key, with its limit) and by each worker, what each backend is planned to have
        loaded, when each user was last served."""
        slots = [(b, RedisSlots.key(b, i)) for b, n in limits.items() for i in range(n)]
        backends = list(limits)
        with self._redis.pipeline(transaction=False) as pipe:
            if slots:
                pipe.mget([key for _, key in slots])
            if backends:
                pipe.mget([RedisSlots.loaded_key(b) for b in backends])
            pipe.hgetall(_PLANNED)
            pipe.hgetall(_SERVED)
            answers = pipe.execute()
        values = answers.pop(0) if slots else []
        rendered = answers.pop(0) if backends else []
        loaded = {b: _text(v) for b, v in zip(backends, rendered, strict=True) if v is not None}
        held = dict.fromkeys(limits, 0)
        held_by: Counter[str] = Counter()
        for (backend, _), value in zip(slots, values, strict=True):
            if value is not None:
                held[backend] += 1
                held_by[_text(value).split("|", 1)[0]] += 1
        served: dict[int, float] = {}
        for key, value in answers[1].items():
            with contextlib.suppress(ValueError):
                served[int(_text(key))] = float(_text(value))
        planned = {_text(k): _text(v) for k, v in answers[0].items()}
        return Snapshot(held, planned, loaded, served, held_by)

    def note(self, planned: dict[str, str], served: dict[int, float]) -> None:
        """Jobs were taken: what their backends will load, and whose they were."""
        with self._redis.pipeline(transaction=False) as pipe:
            for backend, checkpoint in planned.items():
                pipe.hset(_PLANNED, backend, checkpoint)
            for owner, when in served.items():
                pipe.hset(_SERVED, str(owner), repr(when))
            pipe.execute()

    @contextlib.contextmanager
    def planning(self, wait: float = 2.0, hold: float = 5.0) -> Iterator[bool]:
        """One worker plans and takes at a time (a few milliseconds), so two never hand the
        same backend two different jobs. Yields False when the lock stayed busy for ``wait``
        seconds; ``hold`` bounds how long a worker that died holding it blocks the others."""
        token = uuid.uuid4().hex
        deadline = time.monotonic() + wait
        while not self._redis.set(_LOCK, token, nx=True, px=int(hold * 1000)):
            if time.monotonic() > deadline:
                yield False
                return
            time.sleep(0.005)
        try:
            yield True
        finally:
            with contextlib.suppress(RedisError):
                self._redis.eval(self._UNLOCK, 1, _LOCK, token)

    def wake_all(self, sender: str, news: str = FREED, job_ids: Iterable[str] = ()) -> None:
        """Tell every other worker's scheduler to look again, and why: ``FREED`` (a slot
        freed, or work planned for them: plan again), ``TOOK`` (these jobs left the queue:
        no need to read it again for that) or ``CHANGED`` (read the queue again)."""
        try:
            self._redis.publish(CHANNEL, "|".join((sender, news, ",".join(job_ids))))
        except RedisError as exc:  # they look on their own every second anyway
            log.debug("could not wake the fleet: %s", exc)

    def listen(
        self,
        me: str,
        on_wake: Callable[[str, list[str]], None],
        stop: threading.Event,
        subscribed: threading.Event | None = None,
    ) -> threading.Thread:
        """A thread that calls ``on_wake(news, job_ids)`` for every wake-up another worker
        publishes, until ``stop`` (a worker wakes itself without a round trip). It sets
        ``subscribed`` once Redis confirmed the subscription: wake-ups sent before are lost."""

        def loop() -> None:
            while not stop.is_set():
                client: Redis = Redis.from_url(self.url, socket_connect_timeout=2)
                try:
                    with client.pubsub() as channel:  # type: ignore[no-untyped-call]
                        channel.subscribe(CHANNEL)
                        while not stop.is_set():
                            message = channel.get_message(timeout=0.5)
                            if message is None:
                                continue
                            if message["type"] != "message":  # the confirmation
                                if subscribed is not None:
                                    subscribed.set()
                                continue
                            sender, _, rest = _text(message["data"]).partition("|")
                            news, _, ids = rest.partition("|")
                            if sender != me:
                                on_wake(news or CHANGED, [i for i in ids.split(",") if i])
                except RedisError as exc:
                    log.warning("fleet wake-ups unavailable for now (%s); polling", exc)
                    stop.wait(1.0)
                finally:
                    client.close()

        thread = threading.Thread(target=loop, name="fleet-wake", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self._redis.close()


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
