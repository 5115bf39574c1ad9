"""Configuration: one frozen settings object built at the edge.

Precedence, highest first: explicit overrides (command-line flags), ``TIDINGS_*``
environment variables, the TOML file, defaults. This is the only module that reads
``os.environ``. Every problem is raised as ``ConfigError`` naming the key.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from tidings.brokers.redis.urls import is_redis_url, parse_url
from tidings.errors import ConfigError

__all__ = [
    "ApiSettings",
    "AuthSettings",
    "BrokerSettings",
    "ConsoleSettings",
    "EventsSettings",
    "HistorySettings",
    "LimitsSettings",
    "LoggingSettings",
    "NamespaceSettings",
    "ServerSettings",
    "Settings",
    "load_settings",
]

MIN_HMAC_SECRET_BYTES = 32

logger = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text", "auto"] = "auto"


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    path: str = "/ws"
    allowed_origins: tuple[str, ...] = ()
    tls_cert: str = ""
    tls_key: str = ""
    heartbeat_interval: float = Field(default=25, gt=0)
    heartbeat_timeout: float = Field(default=10, gt=0)
    handshake_timeout: float = Field(default=10, gt=0)
    shutdown_timeout: float = Field(default=10, gt=0)
    #: Seconds between failing readiness and closing connections on shutdown, so that a
    #: load balancer stops routing new clients here first.
    drain_delay: float = Field(default=0, ge=0)
    #: ``auto``: development mode when no signing key is configured.
    mode: Literal["auto", "development", "production"] = "auto"

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value


class AuthSettings(_Section):
    algorithms: tuple[str, ...] = ("HS256",)
    secret: str = ""
    public_key_file: str = ""
    jwks_url: str = ""
    jwks_timeout: float = Field(default=5, gt=0)
    issuer: str = ""
    audience: str = ""
    leeway: float = Field(default=30, ge=0)
    channels_claim: str = "channels"
    personal_channel: bool = True
    #: Seconds the personal channel's live events wait at connect for the client's first
    #: command (a ``subscribe`` with ``recover`` then replays in order); 0 disables.
    personal_channel_hold: float = Field(default=1.0, ge=0, le=30)

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        allowed = {
            "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384",
            "PS512", "ES256", "ES384", "ES512", "EdDSA",
        }
        bad = [alg for alg in value if alg not in allowed]
        if bad or not value:
            raise ValueError(f"unsupported algorithm(s) {bad}; choose from {sorted(allowed)}")
        return value


class ApiSettings(_Section):
    keys: tuple[str, ...] = ()
    idempotency_window: float = Field(default=300, gt=0)
    max_body_bytes: int = Field(default=1_048_576, gt=0)
    max_batch: int = Field(default=1000, gt=0)


class BrokerSettings(_Section):
    url: str = "memory://"
    prefix: str = "tidings"
    timeout: float = Field(default=2.0, gt=0)
    #: Replicas that must hold an event before it is acknowledged and shown; "auto":
    #: one where the primary has replicas, else none.
    ack_replicas: Literal["auto"] | int = "auto"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value.startswith("memory://"):
            return value
        if not is_redis_url(value):
            raise ValueError("must be memory://, redis://host:port/db, "
                             "redis+cluster://host:port,... or "
                             "redis+sentinel://host:port,.../service")
        parse_url(value)  # its ValueError names what is wrong, never a password
        return value

    @field_validator("ack_replicas", mode="before")
    @classmethod
    def _ack_replicas(cls, value: object) -> object:
        # Checked here, so that an error names the key and not a member of the union.
        if value == "auto":
            return value
        if isinstance(value, str) and value.isdigit():
            value = int(value)  # environment variables are strings
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 16:
            raise ValueError('must be "auto" or a number of replicas from 0 to 16')
        return value


class HistorySettings(_Section):
    size: int = Field(default=100, ge=0)
    ttl: float = Field(default=300, gt=0)


class LimitsSettings(_Section):
    max_message_bytes: int = Field(default=65536, gt=0)
    max_subscriptions: int = Field(default=128, ge=0)
    commands_per_second: float = Field(default=50, gt=0)
    command_burst: int = Field(default=100, gt=0)
    max_connections_per_user: int = Field(default=32, gt=0)
    send_buffer_bytes: int = Field(default=1_048_576, gt=0)
    #: Consecutive rate-limit violations that close with 4429 (the last one answered first).
    rate_limit_strikes: int = Field(default=10, gt=0)


class NamespaceSettings(_Section):
    rule: Literal["claims", "public", "webhook", "deny"] = "claims"
    url: str = ""
    timeout: float = Field(default=2.0, gt=0)
    cache_ttl: float = Field(default=30, ge=0)


class EventsSettings(_Section):
    #: Empty: every well-formed, non-reserved type is accepted.
    allowed_types: tuple[str, ...] = ()


class ConsoleSettings(_Section):
    #: ``auto``: on in development mode only.
    enabled: Literal["auto", "on", "off"] = "auto"


def _default_namespaces() -> dict[str, NamespaceSettings]:
    return {"default": NamespaceSettings()}


class Settings(BaseSettings):
    """Every setting of a Tidings server; frozen once built."""

    model_config = SettingsConfigDict(
        env_prefix="TIDINGS_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    logging: LoggingSettings = LoggingSettings()
    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    api: ApiSettings = ApiSettings()
    broker: BrokerSettings = BrokerSettings()
    history: HistorySettings = HistorySettings()
    limits: LimitsSettings = LimitsSettings()
    namespaces: dict[str, NamespaceSettings] = Field(default_factory=_default_namespaces)
    events: EventsSettings = EventsSettings()
    console: ConsoleSettings = ConsoleSettings()
    workers: int = Field(default=1, ge=1, le=256)

    @property
    def dev_mode(self) -> bool:
        """Development mode: explicit, or ``auto`` with no signing key configured."""
        if self.server.mode != "auto":
            return self.server.mode == "development"
        return not (self.auth.secret or self.auth.public_key_file or self.auth.jwks_url)

    @property
    def console_enabled(self) -> bool:
        if self.console.enabled == "auto":
            return self.dev_mode
        return self.console.enabled == "on"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives merged into init kwargs below the flags; env sits between.
        return (init_settings, env_settings)


_ENV_PREFIX = "TIDINGS_"


def _section_keys(annotation: Any) -> frozenset[str] | None:
    """The keys of a top-level field that is a section (empty: any, as in namespaces),
    or None for a plain key."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return frozenset(annotation.model_fields)
    if get_origin(annotation) is dict:
        return frozenset()
    return None


#: Sections a variable may name (``TIDINGS_<SECTION>__<KEY>``), with their keys.
_SECTIONS = {
    name: keys for name, field in Settings.model_fields.items()
    if (keys := _section_keys(field.annotation)) is not None
}
#: Top-level keys a variable may name directly (``TIDINGS_WORKERS``).
_TOP_LEVEL_KEYS = frozenset(Settings.model_fields) - frozenset(_SECTIONS)

_LIST_KEYS = {("api", "keys"), ("server", "allowed_origins"), ("auth", "algorithms"),
              ("events", "allowed_types")}


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _setting_path(name: str) -> tuple[str, ...] | None:
    """The key path a variable name sets, or None when the name is not a setting.

    Settings are ``TIDINGS_<SECTION>__<KEY>`` (one level deeper for namespaces) and the
    top-level keys (``TIDINGS_WORKERS``), in any case. Any other name that merely starts
    with ``TIDINGS_`` (a user's ``TIDINGS_KEY``, ``TIDINGS_CONFIG``, the test-suite
    switches) is not one; a name that looks like a mistyped setting gets a warning that
    names it (never its value). Raises ``ConfigError`` for a malformed name inside a
    known section, such as an empty key.
    """
    upper = name.upper()
    if not upper.startswith(_ENV_PREFIX):
        return None
    rest = upper[len(_ENV_PREFIX):].lower()
    head, nested, _ = rest.partition("__")
    if nested and head in _SECTIONS:
        path = tuple(rest.split("__"))
        if not all(path):
            raise ConfigError(name, "malformed variable name")
        return path
    if not nested and rest in _TOP_LEVEL_KEYS:
        return (rest,)
    first, _, key = rest.partition("_")
    if nested or first in _SECTIONS or first in _TOP_LEVEL_KEYS:
        hint = ""
        if not nested and key in _SECTIONS.get(first, ()):
            hint = f" (did you mean {_ENV_PREFIX}{first.upper()}__{key.upper()}?)"
        logger.warning("environment variable %s is not a setting and is ignored%s", name, hint)
    return None


def _env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    """Turn ``TIDINGS_A__B=v`` variables into nested data; lists are comma-separated."""
    layer: dict[str, Any] = {}
    for name, value in environ.items():
        path = _setting_path(name)
        if path is None:
            continue
        node = layer
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(name, "conflicts with another variable")
            node = child
        parsed: Any = value
        if path in _LIST_KEYS:
            parsed = [item.strip() for item in value.split(",") if item.strip()]
        node[path[-1]] = parsed
    return layer


def _key_of(error: Mapping[str, Any]) -> str:
    return ".".join(str(part) for part in error["loc"]) or "config"


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from file, environment and overrides; raise ``ConfigError``."""
    env = os.environ if environ is None else environ
    path = config_file or env.get("TIDINGS_CONFIG") or None
    data: dict[str, Any] = {"namespaces": {"default": {"rule": "claims"}}}
    if path:
        try:
            with Path(path).open("rb") as handle:
                data = _deep_merge(data, tomllib.load(handle))
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    data = _deep_merge(data, _env_layer(env))
    data = _deep_merge(data, overrides or {})
    try:
        # Sources are merged here, so pydantic-settings must not read the env again.
        settings = _StaticSettings(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(_key_of(first), first["msg"]) from None
    _check(settings)
    return settings


class _StaticSettings(Settings):
    """Settings built only from the merged data passed in."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def _check(settings: Settings) -> None:
    """Cross-field rules that a single field validator cannot express."""
    auth = settings.auth
    hmac = any(alg.startswith("HS") for alg in auth.algorithms)
    asym = any(not alg.startswith("HS") for alg in auth.algorithms)
    if not settings.dev_mode:
        if hmac and not auth.secret:
            raise ConfigError("auth.secret", "required for HS* algorithms outside development mode")
        if hmac and len(auth.secret.encode()) < MIN_HMAC_SECRET_BYTES:
            raise ConfigError(
                "auth.secret",
                f"must be at least {MIN_HMAC_SECRET_BYTES} bytes outside development mode",
            )
        if asym and not (auth.public_key_file or auth.jwks_url):
            raise ConfigError("auth.public_key_file", "RS*/ES*/EdDSA need a PEM file or a JWKS URL")
    if auth.public_key_file and not Path(auth.public_key_file).is_file():
        raise ConfigError("auth.public_key_file", "file not found")
    if bool(settings.server.tls_cert) != bool(settings.server.tls_key):
        raise ConfigError("server.tls_key", "tls_cert and tls_key must be set together")
    for key in ("tls_cert", "tls_key"):
        value = getattr(settings.server, key)
        if value and not Path(value).is_file():
            raise ConfigError(f"server.{key}", "file not found")
    if settings.workers > 1 and settings.broker.url.startswith("memory://"):
        raise ConfigError("workers", "more than one worker needs the Redis broker (broker.url)")
    for name, ns in settings.namespaces.items():
        if ns.rule == "webhook" and not ns.url.startswith(("http://", "https://")):
            raise ConfigError(f"namespaces.{name}.url", "a webhook rule needs an http(s) URL")
    if settings.server.heartbeat_timeout <= 0:
        raise ConfigError("server.heartbeat_timeout", "must be positive")
