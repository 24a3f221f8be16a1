"""Art styles, routes (style -> checkpoint + backend pool) and the backends they name.

The default table is the original system's (DESIGN.md section 2):

    realistic                      -> cyberrealistic.safetensors on RUNPOD_REALISTIC_URL (7860)
    anime, cartoon, fantasy, other -> diving.safetensors on RUNPOD_ANIME_CARTOON_FANTASY_URL (7861)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from charforge.config import BackendConfig, Settings
from charforge.domain.capabilities import Capability, capabilities_for
from charforge.domain.checkpoints import same_checkpoint
from charforge.errors import InvalidInput

FALLBACK_STYLE = "anime"

REALISTIC_URL_VAR = "RUNPOD_REALISTIC_URL"
ANIME_URL_VAR = "RUNPOD_ANIME_CARTOON_FANTASY_URL"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    kind: str  # a1111 | comfyui | runpod | local
    url: str  # without credentials: safe to show and log (local: "local:" + models folder)
    auth: tuple[str, str] | None
    timeout: float
    connect_timeout: float
    source: str  # the env var or config key that defines it, for error hints
    simulated: bool = False
    # The largest answer read from it (CHARFORGE_BACKEND_MAX_RESPONSE_BYTES).
    max_response_bytes: int = 64 * 1024 * 1024
    # Left out, what its kind (and worker, workflow) can do.
    capabilities: frozenset[Capability] = None  # type: ignore[assignment]
    workflow: Path | None = None  # comfyui / runpod-comfyui: the user's own workflow
    worker: str | None = None  # runpod: the worker image's API (a1111 | comfyui)
    api_key_env: str | None = None  # runpod: the env var that holds the API key
    models_dir: Path | None = None  # local
    device: str = "auto"  # local: auto | cpu | cuda
    single_file_config: Path | None = None  # local
    # Other names the same server was given (both env vars naming one WebUI, say): it is
    # still one backend with one slot, one loaded checkpoint and one health state.
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.capabilities is None:
            derived = capabilities_for(
                self.kind, worker=self.worker, custom_workflow=self.workflow is not None
            )
            object.__setattr__(self, "capabilities", derived)

    def __repr__(self) -> str:  # never let credentials reach a log line
        return f"BackendSpec(name={self.name!r}, kind={self.kind!r}, url={self.url!r})"

    @property
    def label(self) -> str:
        """The kind as a user reads it: "comfyui (custom workflow)", "runpod (a1111 worker)"."""
        if self.kind == "runpod":
            return f"runpod ({self.worker or 'a1111'} worker)"
        if self.workflow is not None:
            return f"{self.kind} (custom workflow)"
        return self.kind

    def can(self, needs: Iterable[Capability]) -> bool:
        return set(needs) <= self.capabilities

    @property
    def identity(self) -> str:
        """What the backend is, whatever it was called: kind, normalised URL and a digest of
        its credentials. Shared by every process (distributed mode keys its slots by it)."""
        secret = ":".join(self.auth) if self.auth else ""
        digest = hashlib.sha256(secret.encode()).hexdigest()[:12] if secret else "-"
        return f"{self.kind}|{self.url}|{digest}"

    @property
    def key(self) -> str:
        """A short fixed-width form of ``identity`` for keys (Redis, metrics)."""
        return hashlib.sha256(self.identity.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Route:
    style: str
    label: str
    emoji: str
    checkpoint: str
    backends: tuple[str, ...]

    @property
    def indicator(self) -> str:
        """The Generate page's line, e.g. "🟠 Using Anime Style (diving.safetensors)"."""
        return self.indicator_for(self.checkpoint)

    def indicator_for(self, checkpoint: str) -> str:
        """The same line for a character with a checkpoint of its own on this route."""
        return f"{self.emoji} Using {self.label} Style ({checkpoint})"


@dataclass(frozen=True)
class RouteTable:
    routes: dict[str, Route]
    backends: dict[str, BackendSpec]
    # Every name a backend was given -> the name it goes by (its first one).
    names: dict[str, str] = field(default_factory=dict)

    def routes_of(self, backend: str) -> list[str]:
        """The styles whose pool holds ``backend``."""
        return [style for style, route in self.routes.items() if backend in route.backends]

    @property
    def known_styles(self) -> list[str]:
        return list(self.routes)

    def route(self, style: str) -> Route:
        return self.routes.get(style, self.routes[FALLBACK_STYLE])

    def route_for_checkpoint(self, checkpoint: str) -> Route | None:
        for route in self.routes.values():
            if same_checkpoint(route.checkpoint, checkpoint):
                return route
        return None

    def normalize_style(self, value: str, *, field: str) -> str:
        """Case-insensitive style name, or a 422 that lists the known ones."""
        style = value.strip().lower()
        if style not in self.routes:
            known = ", ".join(self.known_styles)
            raise InvalidInput(
                f"Unknown art style '{value}' in {field}. Known styles: {known}.",
                field=field,
                hint=f"Use one of: {known}.",
            )
        return style


_DEFAULT_STYLES: dict[str, tuple[str, str, str, str]] = {
    # style: (label, emoji, checkpoint, default backend name)
    "anime": ("Anime", "🟠", "diving.safetensors", "anime-cartoon-fantasy"),
    "cartoon": ("Cartoon", "🟡", "diving.safetensors", "anime-cartoon-fantasy"),
    "fantasy": ("Fantasy", "🟣", "diving.safetensors", "anime-cartoon-fantasy"),
    "realistic": ("Realistic", "🔵", "cyberrealistic.safetensors", "realistic"),
}


# RunPod's pod proxy drops a request at 100 s (HTTP 524) while the pod keeps working.
RUNPOD_PROXY_SUFFIX = ".proxy.runpod.net"
RUNPOD_PROXY_TIMEOUT = 90.0


_DEFAULT_PORTS = {"http": 80, "https": 443}


def redact(url: str) -> str:
    """The URL with any user:password replaced, for messages."""
    scheme, sep, rest = url.strip().partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``https://user:pw@host/`` -> (``https://host``, (user, pw)). Trailing slash dropped."""
    try:
        parts = urlsplit(url.strip())
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        port = parts.port
    except ValueError:
        valid, port = False, None
    if not valid:
        raise ValueError(f"'{redact(url)}' is not an http(s) URL")
    auth = None
    if parts.username is not None:
        auth = (unquote(parts.username), unquote(parts.password or ""))
    host = parts.hostname or ""
    netloc = host if ":" not in host else f"[{host}]"
    if port and port != _DEFAULT_PORTS[parts.scheme]:  # http://h:80 is http://h
        netloc = f"{netloc}:{port}"
    clean = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return clean, auth


def parse_auth(value: str, *, source: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user:
        raise ValueError(f"{source} must look like user:password (A1111's --api-auth form)")
    return user, password


def _timeout_for(url: str, configured: float, explicit: bool) -> float:
    if not explicit and (urlsplit(url).hostname or "").endswith(RUNPOD_PROXY_SUFFIX):
        return min(configured, RUNPOD_PROXY_TIMEOUT)
    return configured


def build_route_table(settings: Settings) -> RouteTable:
    """Routes and backends from settings; raises ValueError naming the key to fix."""
    backends: dict[str, BackendSpec] = {}

    def add_env_pool(name: str, var: str, urls: str, auth_value: str | None) -> list[str]:
        names: list[str] = []
        entries = [u for u in urls.split(",") if u.strip()]
        if not entries:
            raise ValueError(f"{var} is empty; set it to your A1111/Forge WebUI URL")
        for index, entry in enumerate(entries):
            backend_name = name if index == 0 else f"{name}-{index + 1}"
            try:
                url, auth = split_credentials(entry)
            except ValueError as exc:
                raise ValueError(f"{var}: {exc}") from exc
            if auth_value is not None:
                auth = parse_auth(auth_value, source=var.replace("_URL", "_AUTH"))
            backends[backend_name] = BackendSpec(
                name=backend_name,
                kind="a1111",
                url=url,
                auth=auth,
                timeout=_timeout_for(
                    url, settings.backend_timeout, "backend_timeout" in settings.model_fields_set
                ),
                connect_timeout=settings.backend_connect_timeout,
                source=var,
                simulated=settings.demo,
                max_response_bytes=settings.backend_max_response_bytes,
            )
            names.append(backend_name)
        return names

    def secret(value: object) -> str | None:
        return None if value is None else value.get_secret_value()  # type: ignore[attr-defined]

    pools = {
        "realistic": add_env_pool(
            "realistic",
            REALISTIC_URL_VAR,
            settings.runpod_realistic_url,
            secret(settings.runpod_realistic_auth),
        ),
        "anime-cartoon-fantasy": add_env_pool(
            "anime-cartoon-fantasy",
            ANIME_URL_VAR,
            settings.runpod_anime_cartoon_fantasy_url,
            secret(settings.runpod_anime_cartoon_fantasy_auth),
        ),
    }

    config_name = settings.config_file or "the TOML file"
    for name, cfg in settings.backends.items():
        backends[name] = _configured_backend(
            name, cfg, settings, f"[backends.{name}] in {config_name}"
        )
    unique, names = _one_per_server(backends)

    def canonical(listed: Iterable[str]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(names[n] for n in listed))

    routes: dict[str, Route] = {}
    for style, (label, emoji, checkpoint, pool) in _DEFAULT_STYLES.items():
        routes[style] = Route(style, label, emoji, checkpoint, canonical(pools[pool]))
    for style, rc in settings.routes.items():
        base = routes.get(style)
        if base is None and (rc.checkpoint is None or rc.backends is None):
            raise ValueError(
                f"[routes.{style}] in {config_name} defines a new style: "
                "it needs both checkpoint and backends"
            )
        for backend_name in rc.backends or ():
            if backend_name not in names:
                raise ValueError(
                    f"[routes.{style}] in {config_name} names backend '{backend_name}', "
                    f"which is not defined; known: {', '.join(names)}"
                )
        routes[style] = Route(
            style=style,
            label=rc.label or (base.label if base else style.title()),
            emoji=rc.emoji or (base.emoji if base else "⚪"),
            checkpoint=rc.checkpoint or base.checkpoint,  # type: ignore[union-attr]
            backends=canonical(rc.backends) if rc.backends is not None else base.backends,  # type: ignore[union-attr]
        )
    return RouteTable(routes=routes, backends=unique, names=names)


def _one_per_server(
    specs: dict[str, BackendSpec],
) -> tuple[dict[str, BackendSpec], dict[str, str]]:
    """One backend per server: entries with the same identity (kind, normalised URL,
    credentials) become the first one, which lists the others' names as aliases. Two
    entries for one URL with different kinds cannot both be right: that is an error."""
    unique: dict[str, BackendSpec] = {}
    names: dict[str, str] = {}
    first_of: dict[str, str] = {}  # identity -> name
    kind_at: dict[tuple[str, str], BackendSpec] = {}  # (url, credentials) -> first spec
    for name, spec in specs.items():
        place = (spec.url, spec.identity.rsplit("|", 1)[1])
        other = kind_at.setdefault(place, spec)
        if other.kind != spec.kind:
            raise ValueError(
                f"{spec.source} and {other.source} name the same server ({spec.url}) as "
                f"kind '{spec.kind}' and kind '{other.kind}'; one server has one kind"
            )
        owner = first_of.setdefault(spec.identity, name)
        names[name] = owner
        if owner == name:
            unique[name] = spec
            continue
        first = unique[owner]
        differ = [key for key in _SERVER_SETTINGS if getattr(spec, key) != getattr(first, key)]
        if differ:
            raise ValueError(
                f"{spec.source} and {first.source} name the same server ({spec.url}) with "
                f"different {', '.join(differ)}; one server is one backend: define it once "
                "and name that backend in every route that uses it"
            )
        unique[owner] = replace(first, aliases=(*first.aliases, name))
    return unique, names


# What two names of one server must agree on (their names and sources may differ).
_SERVER_SETTINGS = (
    "timeout",
    "connect_timeout",
    "simulated",
    "workflow",
    "worker",
    "api_key_env",
    "device",
    "single_file_config",
)


def _configured_backend(name: str, cfg: BackendConfig, settings: Settings, key: str) -> BackendSpec:
    if cfg.kind == "local":
        models_dir = (cfg.models_dir or settings.models_dir).expanduser()
        url, auth = f"local:{models_dir}", None
    else:
        try:
            url, auth = split_credentials(cfg.url or "")
        except ValueError as exc:
            raise ValueError(f"{key}: url {exc}") from exc
        models_dir = None
    if cfg.auth is not None:
        auth = parse_auth(cfg.auth.get_secret_value(), source=f"{key} auth")
    if cfg.workflow is not None and not cfg.workflow.is_file():
        raise ValueError(f"{key}: workflow file {cfg.workflow} does not exist")
    if cfg.single_file_config is not None and not cfg.single_file_config.is_dir():
        raise ValueError(f"{key}: single_file_config {cfg.single_file_config} is not a folder")
    worker = (cfg.worker or "a1111") if cfg.kind == "runpod" else None
    return BackendSpec(
        name=name,
        kind=cfg.kind,
        url=url,
        auth=auth,
        timeout=_timeout_for(
            url,
            cfg.timeout_seconds or settings.backend_timeout,
            cfg.timeout_seconds is not None or "backend_timeout" in settings.model_fields_set,
        ),
        connect_timeout=settings.backend_connect_timeout,
        source=key,
        simulated=cfg.simulated or settings.demo,
        max_response_bytes=settings.backend_max_response_bytes,
        workflow=cfg.workflow,
        worker=worker,
        api_key_env=(cfg.api_key_env or "RUNPOD_API_KEY") if cfg.kind == "runpod" else None,
        models_dir=models_dir,
        device=cfg.device or "auto",
        single_file_config=cfg.single_file_config,
    )
