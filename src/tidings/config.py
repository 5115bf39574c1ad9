"""Configuration: one frozen settings object built at the edge.

The models (each key, its type and per-field rules) are in ``tidings.settings`` and
re-exported here; this module loads them: file, environment, strict checks. Each layer's
values are checked against their documented types by ``tidings.config_types``; the rules
that span several keys are here.

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
from typing import Any, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from tidings.config_types import annotation_at, check_table, check_value, parse_env
from tidings.errors import ConfigError
from tidings.protocol.names import is_valid_namespace
from tidings.settings import (
    ApiSettings,
    AuthSettings,
    BrokerSettings,
    ConsoleSettings,
    EventsSettings,
    HistorySettings,
    LimitsSettings,
    LoggingSettings,
    NamespaceSettings,
    ServerSettings,
    Settings,
    TelemetrySettings,
    WebhookEvent,
    WebhooksSettings,
)

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
    "TelemetrySettings",
    "WebhookEvent",
    "WebhooksSettings",
    "load_settings",
]

MIN_HMAC_SECRET_BYTES = 32

logger = logging.getLogger(__name__)


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
    name: keys
    for name, field in Settings.model_fields.items()
    if (keys := _section_keys(field.annotation)) is not None
}
#: Top-level keys a variable may name directly (``TIDINGS_WORKERS``).
_TOP_LEVEL_KEYS = frozenset(Settings.model_fields) - frozenset(_SECTIONS)


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
    rest = upper[len(_ENV_PREFIX) :].lower()
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
    """Turn ``TIDINGS_A__B=v`` variables into nested data, each value parsed per the
    type of its key; raises ``ConfigError`` naming the key (and the variable)."""
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
        annotation = annotation_at(path)
        if annotation is None:
            raise ConfigError(".".join(path), f"unknown key (from {name})")
        parsed = parse_env(annotation, value)
        try:
            check_value(annotation, parsed, path)
        except ConfigError as exc:
            raise ConfigError(exc.key, f"{exc.reason} (from {name})") from None
        node[path[-1]] = parsed
    return layer


def _reason(error: Mapping[str, Any]) -> str:
    """A pydantic error (a range or a validator; types are checked before) in the
    project's words."""
    kind, context = error["type"], error.get("ctx") or {}
    bounds = {
        "greater_than_equal": ("ge", "at least"),
        "greater_than": ("gt", "more than"),
        "less_than_equal": ("le", "at most"),
        "less_than": ("lt", "less than"),
    }
    if kind in bounds:
        name, words = bounds[kind]
        bound = context[name]
        # A float key's bound reads 0.0 in pydantic's context; the docs write 0.
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"must be {words} {bound}"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "value_error" and "error" in context:
        return str(context["error"])
    if kind == "literal_error" and "expected" in context:
        return f"must be {context['expected']}"
    return str(error["msg"])


def _validate(data: Mapping[str, Any], where: str = "") -> Settings:
    """Settings from fully merged data; ``ConfigError`` names the first bad key."""
    try:
        # Sources are merged here, so pydantic-settings must not read the env again.
        return _StaticSettings(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"] if isinstance(part, str))
        raise ConfigError(key or "config", _reason(first) + where) from None


def _read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    require_auth: bool = True,
) -> Settings:
    """Build the settings from file, environment and overrides; raise ``ConfigError``.

    Every layer is checked on its own first, the file as a whole before anything
    overrides it: a bad value is an error even where a flag replaces it. ``server.mode =
    "auto"`` resolves to development only when nothing is configured: no file, no
    ``TIDINGS_*`` setting in the environment and no signing key among ``overrides``.
    ``require_auth=False`` skips the signing-key checks, for commands that never verify
    a token (``tidings publish``).
    """
    env = os.environ if environ is None else environ
    path = config_file or env.get("TIDINGS_CONFIG") or None
    defaults: dict[str, Any] = {"namespaces": {"default": {"rule": "claims"}}}
    file_layer = _read_file(path) if path else {}
    try:
        check_table(Settings, file_layer)
    except ConfigError as exc:
        raise ConfigError(exc.key, f"{exc.reason} (in {path})") from None
    env_layer = _env_layer(env)  # types checked variable by variable
    # Ranges and validators, for each layer on its own (a value overridden is still bad).
    if file_layer:
        _validate(_deep_merge(defaults, file_layer), f" (in {path})")
    if env_layer:
        try:
            _validate(_deep_merge(defaults, env_layer))
        except ConfigError as exc:
            variable = _ENV_PREFIX + exc.key.upper().replace(".", "__")
            raise ConfigError(exc.key, f"{exc.reason} (from {variable})") from None
    check_table(Settings, overrides or {})
    data = _deep_merge(_deep_merge(_deep_merge(defaults, file_layer), env_layer), overrides or {})
    settings = _validate(data)
    telemetry = _resolve_telemetry(settings.telemetry, env)
    if telemetry != settings.telemetry:
        settings = settings.model_copy(update={"telemetry": telemetry})
    if settings.server.mode == "auto":
        auth = settings.auth
        configured = bool(path or env_layer or auth.secret or auth.public_key_file or auth.jwks_url)
        mode = "production" if configured else "development"
        settings = settings.model_copy(
            update={"server": settings.server.model_copy(update={"mode": mode})}
        )
    _check(settings, require_auth=require_auth)
    return settings


#: What ``otlp`` means, by OTLP protocol (the SDK's exporter entry-point names).
_OTLP_EXPORTERS = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}


def _resolve_telemetry(telemetry: TelemetrySettings, env: Mapping[str, str]) -> TelemetrySettings:
    """``tracing`` as ``on`` or ``off``, with the exporters by entry-point name.

    Reads the standard variables that decide whether and where to (``OTEL_SDK_DISABLED``,
    ``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``,
    ``OTEL_EXPORTER_OTLP_PROTOCOL``); the SDK reads every other ``OTEL_*`` variable
    itself. Resolved settings resolve to themselves, so that a worker, which loads its
    settings without an environment, keeps its supervisor's decision.
    """
    named = tuple(
        name.strip().lower()
        for name in env.get("OTEL_TRACES_EXPORTER", "").split(",")
        if name.strip()
    )
    exporters = telemetry.exporters or tuple(name for name in named if name != "none")
    disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    # "none" alone in OTEL_TRACES_EXPORTER asks for no exporter: nothing to trace for.
    if (
        disabled
        or telemetry.tracing == "off"
        or (not exporters and "none" in named)
        or (telemetry.tracing == "auto" and not exporters)
    ):
        return telemetry.model_copy(update={"tracing": "off"})
    variable = next(
        (
            name
            for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
            if env.get(name)
        ),
        "",
    )
    # The specification's default protocol, and the exporter the otel extra installs.
    protocol = env.get(variable, "").strip() or "http/protobuf"
    resolved = []
    for name in exporters or ("otlp",):
        if name == "otlp":
            if protocol not in _OTLP_EXPORTERS:
                raise ConfigError(variable, 'must be "http/protobuf" or "grpc"')
            name = _OTLP_EXPORTERS[protocol]
        resolved.append(name)
    return telemetry.model_copy(
        update={"tracing": "on", "exporters": tuple(dict.fromkeys(resolved))}
    )


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


def _check(settings: Settings, *, require_auth: bool = True) -> None:
    """Cross-field rules that a single field validator cannot express."""
    auth = settings.auth
    hmac = any(alg.startswith("HS") for alg in auth.algorithms)
    asym = any(not alg.startswith("HS") for alg in auth.algorithms)
    if require_auth and not settings.dev_mode:
        if hmac and not auth.secret:
            raise ConfigError(
                "auth.secret",
                "required for HS* algorithms in production mode (a server given a "
                "configuration file or TIDINGS_* settings runs in production mode unless "
                'server.mode = "development")',
            )
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
    internal = settings.server.internal_port
    if internal and internal == settings.server.port:
        raise ConfigError("server.internal_port", "must differ from server.port")
    if settings.workers > 1 and settings.broker.url.startswith("memory://"):
        raise ConfigError("workers", "more than one worker needs the Redis broker (broker.url)")
    for name, ns in settings.namespaces.items():
        # A rule under a name no channel can carry would never apply: say so at start-up.
        if not is_valid_namespace(name):
            raise ConfigError(
                f"namespaces.{name}",
                "not a namespace name: a lowercase letter, then up to 31 of a-z, 0-9, _ and -",
            )
        if ns.rule == "webhook" and not ns.url.startswith(("http://", "https://")):
            raise ConfigError(f"namespaces.{name}.url", "a webhook rule needs an http(s) URL")
    hooks = settings.webhooks
    if hooks.url and not hooks.url.startswith(("http://", "https://")):
        raise ConfigError("webhooks.url", "must be an http(s) URL")
    if hooks.url and not hooks.secret:
        raise ConfigError("webhooks.secret", "required with webhooks.url")
