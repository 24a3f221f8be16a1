"""Art styles, routes (style -> checkpoint + backend pool) and the backends they name.

The default table is the original system's (DESIGN.md section 2):

    realistic                      -> cyberrealistic.safetensors on RUNPOD_REALISTIC_URL (7860)
    anime, cartoon, fantasy, other -> diving.safetensors on RUNPOD_ANIME_CARTOON_FANTASY_URL (7861)
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

from charforge.config import Settings
from charforge.errors import InvalidInput

FALLBACK_STYLE = "anime"

REALISTIC_URL_VAR = "RUNPOD_REALISTIC_URL"
ANIME_URL_VAR = "RUNPOD_ANIME_CARTOON_FANTASY_URL"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    kind: str
    url: str  # without credentials: safe to show and log
    auth: tuple[str, str] | None
    timeout: float
    connect_timeout: float
    source: str  # the env var or config key that defines it, for error hints
    simulated: bool = False

    def __repr__(self) -> str:  # never let credentials reach a log line
        return f"BackendSpec(name={self.name!r}, kind={self.kind!r}, url={self.url!r})"


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
        return f"{self.emoji} Using {self.label} Style ({self.checkpoint})"


@dataclass(frozen=True)
class RouteTable:
    routes: dict[str, Route]
    backends: dict[str, BackendSpec]

    @property
    def known_styles(self) -> list[str]:
        return list(self.routes)

    def route(self, style: str) -> Route:
        return self.routes.get(style, self.routes[FALLBACK_STYLE])

    def route_for_checkpoint(self, checkpoint: str) -> Route | None:
        for route in self.routes.values():
            if route.checkpoint == checkpoint:
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


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``https://user:pw@host/`` -> (``https://host``, (user, pw)). Trailing slash dropped."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"'{url}' is not an http(s) URL")
    auth = None
    if parts.username is not None:
        auth = (unquote(parts.username), unquote(parts.password or ""))
    netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    clean = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return clean, auth


def parse_auth(value: str, *, source: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user:
        raise ValueError(f"{source} must look like user:password (A1111's --api-auth form)")
    return user, password


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
                timeout=settings.backend_timeout,
                connect_timeout=settings.backend_connect_timeout,
                source=var,
                simulated=settings.demo,
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
        key = f"[backends.{name}] in {config_name}"
        try:
            url, auth = split_credentials(cfg.url)
        except ValueError as exc:
            raise ValueError(f"{key}: url {exc}") from exc
        if cfg.auth is not None:
            auth = parse_auth(cfg.auth.get_secret_value(), source=f"{key} auth")
        backends[name] = BackendSpec(
            name=name,
            kind=cfg.kind,
            url=url,
            auth=auth,
            timeout=cfg.timeout_seconds or settings.backend_timeout,
            connect_timeout=settings.backend_connect_timeout,
            source=key,
            simulated=cfg.simulated or settings.demo,
        )

    routes: dict[str, Route] = {}
    for style, (label, emoji, checkpoint, pool) in _DEFAULT_STYLES.items():
        routes[style] = Route(style, label, emoji, checkpoint, tuple(pools[pool]))
    for style, rc in settings.routes.items():
        base = routes.get(style)
        if base is None and (rc.checkpoint is None or rc.backends is None):
            raise ValueError(
                f"[routes.{style}] in {config_name} defines a new style: "
                "it needs both checkpoint and backends"
            )
        names = tuple(rc.backends) if rc.backends is not None else base.backends  # type: ignore[union-attr]
        for backend_name in names:
            if backend_name not in backends:
                raise ValueError(
                    f"[routes.{style}] in {config_name} names backend '{backend_name}', "
                    f"which is not defined; known: {', '.join(backends)}"
                )
        routes[style] = Route(
            style=style,
            label=rc.label or (base.label if base else style.title()),
            emoji=rc.emoji or (base.emoji if base else "⚪"),
            checkpoint=rc.checkpoint or base.checkpoint,  # type: ignore[union-attr]
            backends=names,
        )
    return RouteTable(routes=routes, backends=backends)
