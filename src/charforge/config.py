"""Settings: environment variables, then an optional TOML file named by ``CHARFORGE_CONFIG``.

Environment wins over the file, the file over the defaults. The seed's variables
``RUNPOD_REALISTIC_URL`` and ``RUNPOD_ANIME_CARTOON_FANTASY_URL`` keep their meaning; a
comma-separated list in either makes a pool of several backends for that route.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV_VAR = "CHARFORGE_CONFIG"


BackendKind = Literal["a1111", "comfyui", "runpod", "local"]

# Which keys each kind takes besides kind and simulated.
_KIND_KEYS: dict[str, set[str]] = {
    "a1111": {"url", "auth", "timeout_seconds"},
    "comfyui": {"url", "auth", "workflow", "timeout_seconds"},
    "runpod": {"url", "worker", "api_key_env", "workflow", "timeout_seconds"},
    # No timeout: a generation on this machine is not a network call that may hang.
    "local": {"models_dir", "device", "single_file_config"},
}


class BackendConfig(BaseModel):
    """One backend as written in the TOML file under ``[backends.NAME]``."""

    model_config = {"extra": "forbid"}

    kind: BackendKind = "a1111"
    # a1111, comfyui: the server's base URL; runpod: https://api.runpod.ai/v2/ENDPOINT_ID.
    url: str | None = None
    # "user:password": A1111's --api-auth, or a proxy's Basic auth in front of ComfyUI.
    # Never echoed back or logged.
    auth: SecretStr | None = None
    timeout_seconds: float | None = Field(default=None, gt=0)
    simulated: bool = False
    # comfyui, runpod (ComfyUI worker): an API-format workflow JSON with {{placeholders}}.
    workflow: Path | None = None
    # runpod: which worker image the endpoint runs, and the env var holding the API key
    # (the key itself never goes into a file).
    worker: Literal["a1111", "comfyui"] | None = None
    api_key_env: str | None = None
    # local: checkpoints folder (default CHARFORGE_MODELS_DIR), device, and the folder with
    # the model's config and tokenizer files that single-file checkpoints need offline.
    models_dir: Path | None = None
    device: Literal["auto", "cpu", "cuda"] | None = None
    single_file_config: Path | None = None

    @model_validator(mode="after")
    def _keys_fit_kind(self) -> BackendConfig:
        allowed = _KIND_KEYS[self.kind] | {"kind", "simulated"}
        stray = sorted(self.model_fields_set - allowed)
        if stray:
            raise ValueError(
                f"{', '.join(stray)} cannot be set for a backend of kind '{self.kind}' "
                f"(it takes: {', '.join(sorted(_KIND_KEYS[self.kind]))})"
            )
        if self.kind != "local" and not self.url:
            raise ValueError(f"a backend of kind '{self.kind}' needs a url")
        if self.workflow is not None and self.kind == "runpod" and self.worker != "comfyui":
            raise ValueError('workflow needs worker = "comfyui" on a runpod backend')
        return self


class RouteConfig(BaseModel):
    """What one art style resolves to, under ``[routes.STYLE]``."""

    model_config = {"extra": "forbid"}

    checkpoint: str | None = None
    backends: list[str] | None = None
    label: str | None = None
    emoji: str | None = None


class GenerationDefaults(BaseModel):
    """The original system's high-quality defaults; ``[defaults]`` in the TOML file."""

    model_config = {"extra": "forbid"}

    width: int = 512
    height: int = 768
    steps: int = 25
    cfg_scale: float = 8.0
    sampler: str = "DPM++ 2M"
    scheduler: str = "Karras"
    hires: bool = True
    hires_scale: float = 1.5
    hires_upscaler: str = "Latent"
    denoising_strength: float = 0.5
    hires_steps: int = 0  # 0: as many as steps (A1111's hr_second_pass_steps)
    clip_skip: int = 1


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CHARFORGE_",
        # A misspelt key in the TOML file is an error, not a silently ignored setting.
        extra="forbid",
        populate_by_name=True,
    )

    data_dir: Path = Path("./data")
    database_url: str | None = None
    # Checkpoints of the local engine (backends of kind "local"): single .safetensors files
    # and diffusers folders.
    models_dir: Path = Path("./models")

    runpod_realistic_url: str = Field(
        default="http://127.0.0.1:7860/",
        validation_alias=AliasChoices("RUNPOD_REALISTIC_URL", "runpod_realistic_url"),
    )
    runpod_anime_cartoon_fantasy_url: str = Field(
        default="http://127.0.0.1:7861/",
        validation_alias=AliasChoices(
            "RUNPOD_ANIME_CARTOON_FANTASY_URL", "runpod_anime_cartoon_fantasy_url"
        ),
    )
    runpod_realistic_auth: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("RUNPOD_REALISTIC_AUTH", "runpod_realistic_auth"),
    )
    runpod_anime_cartoon_fantasy_auth: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "RUNPOD_ANIME_CARTOON_FANTASY_AUTH", "runpod_anime_cartoon_fantasy_auth"
        ),
    )

    # Finite, configurable timeouts: connecting fails fast, a generation may take minutes.
    backend_connect_timeout: float = Field(default=5.0, gt=0)
    backend_timeout: float = Field(default=300.0, gt=0)
    probe_timeout: float = Field(default=3.0, gt=0)
    # How long POST /api/image-generation/generate waits before answering 202 with the job.
    generate_wait: float = Field(default=900.0, gt=0)
    # Accepted so older config files keep loading; jobs now run one per backend slot.
    workers: int = Field(default=2, ge=1, le=64)

    # Jobs: attempts per job (first try included), backoff between them, the lease a running
    # job holds (renewed while it runs; when it lapses the job is re-queued), and how long a
    # job may be passed over so a backend can stay on its checkpoint.
    job_max_attempts: int = Field(default=3, ge=1, le=20)
    retry_backoff: float = Field(default=1.0, ge=0, le=300)
    retry_backoff_max: float = Field(default=30.0, ge=0, le=3600)
    job_lease: float = Field(default=60.0, ge=2, le=3600)
    max_queue_wait: float = Field(default=120.0, ge=0, le=86400)
    # Pipelining: each backend takes a second job while one runs; it is prepared and waits at
    # the backend's door (in charforge, not in the WebUI's queue) so that storing one job's
    # images overlaps the next one's generation.
    pipeline: bool = True
    # Backend health: probe period, consecutive failures before a backend is marked down,
    # and the longest pause between probes of a down backend (the pause doubles up to it).
    health_interval: float = Field(default=15.0, gt=0, le=3600)
    health_failures: int = Field(default=3, ge=1, le=100)
    health_backoff_max: float = Field(default=300.0, gt=0, le=86400)

    # Distributed mode: a Celery broker (Redis) makes `serve` enqueue and `worker` execute.
    broker_url: str | None = None
    # A queued job whose message has not been picked up for this long is sent again (a lost
    # message never strands a job; a duplicate is harmless because claiming is conditional).
    resend_after: float = Field(default=600.0, gt=0)

    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"

    backends: dict[str, BackendConfig] = Field(default_factory=dict)
    routes: dict[str, RouteConfig] = Field(default_factory=dict)
    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults)

    # Signs the web session cookie; generated once into the data dir when not given.
    secret_key: SecretStr | None = None
    # Send the session cookie only over HTTPS; set it when charforge sits behind TLS.
    cookie_secure: bool = False
    session_days: int = Field(default=14, ge=1, le=365)

    demo: bool = False

    # Safety (README "Security"). A TOML file of restricted-content categories; the built-in
    # category against sexual content involving minors is always on, with or without it.
    content_policy: Path | None = None
    # Quotas, off (None) unless set; per-user permissions may override them.
    quota_images_per_day: int | None = Field(default=None, ge=0)
    max_active_jobs_per_user: int | None = Field(default=None, ge=1)
    # Distributed mode: how long a starting worker tries the broker before it stops, saying so.
    broker_wait_seconds: float = Field(default=30.0, gt=0, le=3600)
    # Output screening: an image made without nsfw scoring above this is withheld (0
    # withholds all, 1 none). 0.8 is the open_nsfw authors' "unsafe" line (README "Security").
    nsfw_threshold: float = Field(default=0.8, ge=0.0, le=1.0)
    # Sign-in: failures per account and per address allowed in the window before a 429.
    login_attempts: int = Field(default=10, ge=1, le=10_000)
    login_window_seconds: float = Field(default=900.0, gt=0)
    # Requests: the largest JSON body read (a file upload has its own limit).
    max_json_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Backends: the largest answer read from one (streamed, stopped at the cap).
    backend_max_response_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)

    @field_validator("routes")
    @classmethod
    def _lower_route_keys(cls, value: dict[str, RouteConfig]) -> dict[str, RouteConfig]:
        return {key.strip().lower(): route for key, route in value.items()}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_ENV_VAR)
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    @property
    def config_file(self) -> str | None:
        return os.environ.get(CONFIG_ENV_VAR)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'charforge.db').resolve()}"


def load_settings(**overrides: Any) -> Settings:
    """Read settings, turning a bad file or variable into a message a user can act on."""
    config_file = os.environ.get(CONFIG_ENV_VAR)
    if config_file and not Path(config_file).is_file():
        raise SettingsError(
            f"{CONFIG_ENV_VAR}={config_file} does not name a readable file; "
            "unset it or point it at your charforge TOML file."
        )
    try:
        return Settings(**overrides)
    except Exception as exc:  # pydantic ValidationError or a TOML syntax error
        raise SettingsError(f"Invalid charforge settings: {exc}") from exc


class SettingsError(Exception):
    """Settings cannot be used; the message says which variable or key to fix."""
