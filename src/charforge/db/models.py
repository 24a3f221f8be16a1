"""Tables. Times are naive UTC (SQLite keeps no zone); ids the client sees are UUID strings."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    # Bumped on sign-out: every session cookie signed with an older epoch stops working.
    session_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # What an administrator granted (services.permissions): nsfw, styles, checkpoints,
    # imagesPerDay, maxActiveJobs. A key absent means the default; NULL means all defaults.
    permissions: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    # sha256 of the token: tokens are 256-bit random, so a fast hash is enough and lookup is O(1).
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)


class Character(Base):
    __tablename__ = "characters"
    __table_args__ = (Index("ix_characters_owner_created", "owner_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text, default="")
    appearance: Mapped[str] = mapped_column(Text, default="")
    # NULL for characters made before styles were stored: the fallback rules apply.
    primary_style: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(255))
    model_hash: Mapped[str | None] = mapped_column(String(64))
    # The look beyond the appearance text: its own negative prompt, LoRAs ([{name, weight}])
    # added to every prompt, an optional fixed seed, and how strongly its reference images
    # condition a generation by default.
    negative_prompt: Mapped[str] = mapped_column(Text, default="", server_default="")
    loras: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=list)
    seed: Mapped[int | None] = mapped_column(BigInteger)
    identity_strength: Mapped[float] = mapped_column(Float, default=0.6, server_default="0.6")
    # The SillyTavern card it was imported from, every field kept for a lossless export.
    card: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class Reference(Base):
    """A reference image of a character: what identity conditioning and scoring compare to."""

    __tablename__ = "character_references"
    __table_args__ = (Index("ix_references_character_created", "character_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    character_id: Mapped[str] = mapped_column(ForeignKey("characters.id", ondelete="CASCADE"))
    file_path: Mapped[str] = mapped_column(String(512))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))  # upload | image | card
    image_id: Mapped[str | None] = mapped_column(String(36))  # the promoted image, if any
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Batch(Base):
    """Many jobs submitted as one: its state is read from its jobs' states."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_owner_created", "owner_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    total: Mapped[int] = mapped_column(Integer)
    request: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # the shared fields
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_owner_created", "owner_id", "created_at"),
        Index("ix_jobs_state", "state"),
        Index("ix_jobs_state_checkpoint", "state", "checkpoint"),
        Index("ix_jobs_batch", "batch_id", "batch_index"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    character_id: Mapped[str] = mapped_column(
        ForeignKey("characters.id", ondelete="CASCADE"), index=True
    )
    state: Mapped[str] = mapped_column(String(16), default="queued")
    art_style: Mapped[str] = mapped_column(String(32))
    checkpoint: Mapped[str] = mapped_column(String(255))
    checkpoint_hash: Mapped[str | None] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    user_prompt: Mapped[str] = mapped_column(Text)
    # The request as the client sent it: "use these settings again" starts from this.
    request: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    backend: Mapped[str | None] = mapped_column(String(100))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The batch it is item ``batch_index`` of (None: a job on its own).
    batch_id: Mapped[str | None] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE", name="fk_jobs_batch_id")
    )
    batch_index: Mapped[int | None] = mapped_column(Integer)
    count: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # Who runs it and until when: a lapsed lease means the runner died, and the job is
    # re-queued. Storing images checks the lease, so a runner that lost it stores nothing.
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime)
    # A retry waits out its backoff; the queue message was last sent at enqueued_at.
    not_before: Mapped[datetime | None] = mapped_column(DateTime)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime)
    progress: Mapped[float | None] = mapped_column(Float)
    step: Mapped[int | None] = mapped_column(Integer)
    steps: Mapped[int | None] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_hint: Mapped[str | None] = mapped_column(Text)
    error_field: Mapped[str | None] = mapped_column(String(64))
    # Identity: the references, strength and score threshold asked for, and each try's seed
    # and score (see jobs.identity). Style transfer: {"from": style, "to": style}.
    identity: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    style_transfer: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class JobAttempt(Base):
    """One try of a job on one backend: where, when, and how it ended."""

    __tablename__ = "job_attempts"
    __table_args__ = (Index("ux_job_attempts_job_number", "job_id", "number", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    backend: Mapped[str] = mapped_column(String(100))
    worker: Mapped[str] = mapped_column(String(100))
    # running | succeeded | failed | retried | interrupted (its runner died) | cancelled
    outcome: Mapped[str] = mapped_column(String(16), default="running")
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (
        Index("ix_images_character_created", "character_id", "created_at", "id"),
        # One stored image per requested image, whatever retries overlap.
        Index("ux_images_job_position", "job_id", "position", unique=True),
        Index("ix_images_withheld_created", "withheld", "created_at"),
        Index("ix_images_owner_created", "owner_id", "created_at", "id"),
        # The gallery's favourites: a few among many, found without a scan.
        Index(
            "ix_images_character_favorite_created", "character_id", "favorite", "created_at", "id"
        ),
        Index("ix_images_owner_favorite_created", "owner_id", "favorite", "created_at", "id"),
        # The gallery's count and filter choices, read from the index alone.
        Index(
            "ix_images_character_facets",
            "owner_id",
            "character_id",
            "withheld",
            "checkpoint",
            "art_style",
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    character_id: Mapped[str] = mapped_column(ForeignKey("characters.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    file_path: Mapped[str] = mapped_column(String(512))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)  # A1111 seeds go up to 2**32-1
    art_style: Mapped[str] = mapped_column(String(32))
    checkpoint: Mapped[str] = mapped_column(String(255))
    checkpoint_hash: Mapped[str | None] = mapped_column(String(64))
    backend: Mapped[str] = mapped_column(String(100))
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    infotext: Mapped[str] = mapped_column(Text)
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    # {applied, strength, method} or {applied: false, reason}; {score, method, reason,
    # reachedMinScore}; {from, to}. None for images made before identity existed.
    identity: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    consistency: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    style_transfer: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The output screening's score (0..1); None when the job had nsfw on (not screened).
    nsfw_score: Mapped[float | None] = mapped_column(Float)
    # Screened above the threshold: in quarantine, seen only by admins until released.
    withheld: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The owner's own marks in the gallery.
    favorite: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class AuditEntry(Base):
    """One change an administrator made (API, CLI or page): who, what, to whom, before/after."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_at", "at", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))  # a user name, or "cli"
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class LoginFailure(Base):
    """A failed sign-in, once per account and once per address: a table, so the throttle
    holds across processes and restarts."""

    __tablename__ = "login_failures"
    __table_args__ = (Index("ix_login_failures_scope_key_at", "scope", "key", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    scope: Mapped[str] = mapped_column(String(16))  # account | address
    key: Mapped[str] = mapped_column(String(255))
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class PromptTemplate(Base):
    """A user's own prompt template: ``{character}``, ``{appearance}`` and named slots such as
    ``{outfit}``; the built-in ones are in code, read-only, and shared by everyone."""

    __tablename__ = "prompt_templates"
    __table_args__ = (UniqueConstraint("owner_id", "name", name="uq_prompt_templates_owner_name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="", server_default="")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class Preset(Base):
    """A user's saved generation settings (sampler, steps, hires, ...), by name."""

    __tablename__ = "presets"
    __table_args__ = (UniqueConstraint("owner_id", "name", name="uq_presets_owner_name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
