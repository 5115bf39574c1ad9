"""The settings models: every key of a Tidings server's configuration, its type and its
per-field rules; frozen once built.

Loading (the TOML file, ``TIDINGS_*`` variables, strict type checks, cross-field rules)
is ``tidings.config``'s, which re-exports these models; a new key is declared here and
documented in docs/configuration.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from tidings.brokers.redis.urls import is_redis_url, parse_url

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
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text", "auto"] = "auto"


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    path: str = "/ws"
    #: The SSE fallback transport's path (commands at ``<sse_path>/commands``); "" is off.
    sse_path: str = "/sse"
    allowed_origins: tuple[str, ...] = ()
    tls_cert: str = ""
    tls_key: str = ""
    heartbeat_interval: float = Field(default=25, gt=0)
    heartbeat_timeout: float = Field(default=10, gt=0)
    handshake_timeout: float = Field(default=10, gt=0)
    #: Offer-driven permessage-deflate (RFC 7692), without context takeover.
    permessage_deflate: bool = False
    shutdown_timeout: float = Field(default=10, gt=0)
    #: Seconds between failing readiness and closing connections on shutdown, so that a
    #: load balancer stops routing new clients here first.
    drain_delay: float = Field(default=0, ge=0)
    #: ``auto``: development mode only when nothing is configured (no file, no ``TIDINGS_*``
    #: setting, no signing key); ``load_settings`` resolves it to one of the other two.
    mode: Literal["auto", "development", "production"] = "auto"
    #: When set, the server API, metrics, probes and console are served on this second
    #: listener and not on ``port``, so that the publish API need not face the internet.
    internal_port: int | None = Field(default=None, ge=0, le=65535)
    internal_host: str = "127.0.0.1"

    @field_validator("host", "internal_host")
    @classmethod
    def _host(cls, value: str) -> str:
        # An empty host would bind every interface: that must be asked for by name.
        if not value.strip():
            raise ValueError("must not be empty (0.0.0.0 listens on every interface)")
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @field_validator("sse_path")
    @classmethod
    def _sse_path(cls, value: str) -> str:
        if value and (not value.startswith("/") or value.endswith("/")):
            raise ValueError("must be empty or start with '/' and not end with '/'")
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
            "HS256",
            "HS384",
            "HS512",
            "RS256",
            "RS384",
            "RS512",
            "PS256",
            "PS384",
            "PS512",
            "ES256",
            "ES384",
            "ES512",
            "EdDSA",
        }
        if not value:
            raise ValueError(f"must name at least one of {sorted(allowed)}")
        bad = [alg for alg in value if alg not in allowed]
        if bad:
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
            raise ValueError(
                "must be memory://, redis://host:port/db, "
                "redis+cluster://host:port,... or "
                "redis+sentinel://host:port,.../service"
            )
        parse_url(value)  # its ValueError names what is wrong, never a password
        return value

    @field_validator("ack_replicas", mode="before")
    @classmethod
    def _ack_replicas(cls, value: object) -> object:
        # Checked here, so that an error names the key and not a member of the union.
        if value == "auto":
            return value
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
    #: Subscribers get ``join``/``leave`` messages for users (``tidings.presence_events``).
    presence_events: bool = False
    #: Seconds a user's leave waits for them to come back (anywhere in the cluster).
    presence_ttl: float = Field(default=5.0, gt=0)


#: The presence webhooks ``[webhooks] events`` may name.
WebhookEvent = Literal["channel_occupied", "channel_vacated", "user_joined", "user_left"]


class WebhooksSettings(_Section):
    #: Empty: no presence webhooks.
    url: str = ""
    #: Signs each POST (HMAC-SHA256); never logged.
    secret: str = Field(default="", repr=False)
    events: tuple[WebhookEvent, ...] = (
        "channel_occupied",
        "channel_vacated",
        "user_joined",
        "user_left",
    )
    queue_size: int = Field(default=10_000, gt=0)
    timeout: float = Field(default=5.0, gt=0)
    max_attempts: int = Field(default=8, gt=0)
    retry_delay: float = Field(default=0.5, gt=0)
    max_retry_delay: float = Field(default=60.0, gt=0)


class EventsSettings(_Section):
    #: Empty: every well-formed, non-reserved type is accepted.
    allowed_types: tuple[str, ...] = ()


class ConsoleSettings(_Section):
    #: ``auto``: on in development mode only.
    enabled: Literal["auto", "on", "off"] = "auto"


class TelemetrySettings(_Section):
    #: OpenTelemetry traces (the ``otel`` extra). ``auto``: on when ``OTEL_TRACES_EXPORTER``
    #: names an exporter (or ``exporters`` is set); ``load_settings`` resolves it to ``on``
    #: or ``off``, and ``OTEL_SDK_DISABLED=true`` always means ``off``.
    tracing: Literal["auto", "on", "off"] = "auto"
    #: Span exporters by their OpenTelemetry names (``otlp``, ``otlp_proto_http``,
    #: ``otlp_proto_grpc``, ``console``). Empty: those ``OTEL_TRACES_EXPORTER`` names, else
    #: ``otlp``; ``load_settings`` resolves ``otlp`` by ``OTEL_EXPORTER_OTLP_PROTOCOL``.
    exporters: tuple[str, ...] = ()


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
    telemetry: TelemetrySettings = TelemetrySettings()
    webhooks: WebhooksSettings = WebhooksSettings()
    workers: int = Field(default=1, ge=1, le=256)

    @property
    def dev_mode(self) -> bool:
        """Development mode. ``load_settings`` resolves ``auto``; settings built any other
        way with ``auto`` are production settings: development is only ever asked for."""
        return self.server.mode == "development"

    @property
    def secrets(self) -> tuple[str, ...]:
        """The configured secret values, which every log line has redacted: one list, so
        that the server and each ``--workers`` process redact the same ones."""
        values = (self.auth.secret, *self.api.keys, self.webhooks.secret)
        return tuple(value for value in values if value)

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
