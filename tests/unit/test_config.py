"""Unit tests for tidings.config: layer precedence, environment parsing and errors by key."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from tidings.config import MIN_HMAC_SECRET_BYTES, Settings, load_settings
from tidings.errors import ConfigError

SECRET = "s" * MIN_HMAC_SECRET_BYTES


@pytest.fixture
def toml(tmp_path: Path) -> Callable[[str], Path]:
    """Write a TOML configuration file and return its path."""

    def write(text: str, name: str = "tidings.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def load(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    *,
    require_auth: bool = True,
) -> Settings:
    """Load settings isolated from the real environment."""
    return load_settings(
        config_file,
        overrides,
        environ={} if environ is None else environ,
        require_auth=require_auth,
    )


def layers(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Load settings for a test about layers and types: a file or environment means
    production mode, whose signing-key check is not what these tests are about."""
    return load(overrides, environ, config_file, require_auth=False)


def error_of(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    *,
    require_auth: bool = True,
) -> ConfigError:
    """Return the ConfigError that loading these layers raises."""
    with pytest.raises(ConfigError) as info:
        load(overrides, environ, config_file, require_auth=require_auth)
    return info.value


# -- defaults and layers ------------------------------------------------------------------


def test_defaults() -> None:
    """With nothing configured the documented defaults apply, in development mode."""
    settings = load()
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8000
    assert settings.server.path == "/ws"
    assert settings.server.heartbeat_interval == 25
    assert settings.server.heartbeat_timeout == 10
    assert settings.auth.algorithms == ("HS256",)
    assert settings.auth.leeway == 30
    assert settings.auth.personal_channel is True
    assert settings.broker.url == "memory://"
    assert settings.history.size == 100
    assert settings.limits.max_subscriptions == 128
    assert settings.limits.commands_per_second == 50
    assert settings.limits.max_message_bytes == 65536
    assert settings.api.keys == ()
    assert settings.events.allowed_types == ()
    assert settings.workers == 1
    assert set(settings.namespaces) == {"default"}
    assert settings.namespaces["default"].rule == "claims"
    assert settings.dev_mode
    assert settings.console_enabled


def test_precedence_across_all_layers(toml: Callable[..., Path]) -> None:
    """Flags beat environment, environment beats the file, the file beats defaults."""
    path = toml(
        """
        [server]
        port = 8001
        host = "0.0.0.0"
        heartbeat_interval = 5
        path = "/file"

        [limits]
        max_subscriptions = 7
        """
    )
    environ = {
        "TIDINGS_SERVER__PORT": "8002",
        "TIDINGS_SERVER__HEARTBEAT_INTERVAL": "6",
        "TIDINGS_LIMITS__COMMAND_BURST": "9",
    }
    overrides = {"server": {"port": 8003}}

    assert layers(config_file=path).server.port == 8001
    assert layers(environ=environ, config_file=path).server.port == 8002
    settings = layers(overrides, environ, path)
    assert settings.server.port == 8003  # flag
    assert settings.server.heartbeat_interval == 6  # env over file
    assert settings.server.host == "0.0.0.0"  # file only
    assert settings.server.path == "/file"  # file only
    assert settings.limits.max_subscriptions == 7  # file, next to an env key of the section
    assert settings.limits.command_burst == 9  # env only
    assert settings.limits.commands_per_second == 50  # default
    assert settings.server.heartbeat_timeout == 10  # default


def test_overrides_merge_into_sections() -> None:
    """An override of one key keeps the other keys of its section from lower layers."""
    settings = layers({"limits": {"max_subscriptions": 3}}, {"TIDINGS_LIMITS__COMMAND_BURST": "4"})
    assert settings.limits.max_subscriptions == 3
    assert settings.limits.command_burst == 4


def test_config_file_from_environment(toml: Callable[..., Path]) -> None:
    """TIDINGS_CONFIG names the file when no explicit file is given."""
    path = toml("[history]\nsize = 12\n")
    assert layers(environ={"TIDINGS_CONFIG": str(path)}).history.size == 12


def test_explicit_config_file_beats_environment_file(toml: Callable[..., Path]) -> None:
    """An explicit --config file wins over TIDINGS_CONFIG."""
    env_file = toml("[history]\nsize = 12\n", "env.toml")
    flag_file = toml("[history]\nsize = 34\n", "flag.toml")
    settings = layers(environ={"TIDINGS_CONFIG": str(env_file)}, config_file=flag_file)
    assert settings.history.size == 34


def test_tidings_config_is_not_a_setting(toml: Callable[..., Path]) -> None:
    """TIDINGS_CONFIG itself is not parsed as a configuration key."""
    path = toml("")
    assert layers(environ={"TIDINGS_CONFIG": str(path)}).history.size == 100


def test_environment_types_and_names() -> None:
    """Environment strings are converted to the key's type; names are case-insensitive."""
    settings = layers(
        environ={
            "TIDINGS_AUTH__PERSONAL_CHANNEL": "false",
            "tidings_server__port": "9001",
            "TIDINGS_SERVER__HEARTBEAT_INTERVAL": "2.5",
            "TIDINGS_LOGGING__LEVEL": "debug",
            "TIDINGS_NAMESPACES__NEWS__RULE": "public",
            "PATH": "/usr/bin",
            "OTHER_SERVER__PORT": "1",
        }
    )
    assert settings.auth.personal_channel is False
    assert settings.server.port == 9001
    assert settings.server.heartbeat_interval == 2.5
    assert settings.logging.level == "debug"
    assert settings.namespaces["news"].rule == "public"
    assert settings.namespaces["default"].rule == "claims"


@pytest.mark.parametrize(
    ("variable", "section", "key"),
    [
        ("TIDINGS_API__KEYS", "api", "keys"),
        ("TIDINGS_SERVER__ALLOWED_ORIGINS", "server", "allowed_origins"),
        ("TIDINGS_EVENTS__ALLOWED_TYPES", "events", "allowed_types"),
    ],
)
def test_environment_lists_are_comma_separated(variable: str, section: str, key: str) -> None:
    """List keys from the environment split on commas, trimming blanks and empty items."""
    settings = layers(environ={variable: " alpha, beta,,gamma ,"})
    assert getattr(getattr(settings, section), key) == ("alpha", "beta", "gamma")


def test_environment_algorithms_list() -> None:
    """TIDINGS_AUTH__ALGORITHMS takes a comma-separated list too."""
    settings = layers(environ={"TIDINGS_AUTH__ALGORITHMS": "HS256,HS512"})
    assert settings.auth.algorithms == ("HS256", "HS512")


def test_environment_list_replaces_file_list(toml: Callable[..., Path]) -> None:
    """A list from the environment replaces the file's list rather than extending it."""
    path = toml('[api]\nkeys = ["file-key"]\n')
    assert layers(config_file=path).api.keys == ("file-key",)
    assert layers(environ={"TIDINGS_API__KEYS": "env-key"}, config_file=path).api.keys == (
        "env-key",
    )
    assert layers(
        {"api": {"keys": ["flag-key"]}}, {"TIDINGS_API__KEYS": "env-key"}, path
    ).api.keys == ("flag-key",)


def test_operations_example_file(toml: Callable[..., Path]) -> None:
    """The example configuration of the operator contract loads as documented."""
    path = toml(
        f"""
        [logging]
        level = "info"
        format = "auto"

        [server]
        host = "127.0.0.1"
        port = 8000
        path = "/ws"
        allowed_origins = []
        tls_cert = ""
        tls_key = ""
        heartbeat_interval = 25
        heartbeat_timeout = 10

        [auth]
        algorithms = ["HS256"]
        secret = "{SECRET}"
        public_key_file = ""
        jwks_url = ""
        issuer = ""
        audience = ""
        leeway = 30
        channels_claim = "channels"
        personal_channel = true

        [api]
        keys = []

        [broker]
        url = "memory://"

        [history]
        size = 100
        ttl = 300

        [limits]
        max_message_bytes = 65536
        max_subscriptions = 128
        commands_per_second = 50
        max_connections_per_user = 32
        send_buffer_bytes = 1048576

        [namespaces.default]
        rule = "claims"

        [namespaces.news]
        rule = "public"

        [namespaces.orders]
        rule = "webhook"
        url = "http://127.0.0.1:9000/authorize"
        timeout = 2.0
        cache_ttl = 30
        """
    )
    settings = load(config_file=path)
    assert not settings.dev_mode
    assert settings.namespaces["orders"].url == "http://127.0.0.1:9000/authorize"
    assert settings.namespaces["orders"].timeout == 2.0
    assert {name: ns.rule for name, ns in settings.namespaces.items()} == {
        "default": "claims",
        "news": "public",
        "orders": "webhook",
    }


# -- namespaces ---------------------------------------------------------------------------


def test_namespace_in_file_keeps_default(toml: Callable[..., Path]) -> None:
    """Configuring [namespaces.news] keeps the implicit default namespace."""
    settings = layers(config_file=toml('[namespaces.news]\nrule = "public"\n'))
    assert settings.namespaces["news"].rule == "public"
    assert settings.namespaces["default"].rule == "claims"


def test_namespace_override_keeps_default() -> None:
    """Namespaces given as overrides keep the default namespace too."""
    settings = load({"namespaces": {"news": {"rule": "deny"}}})
    assert set(settings.namespaces) == {"default", "news"}


def test_default_namespace_can_be_changed(toml: Callable[..., Path]) -> None:
    """The default namespace's rule can itself be configured."""
    settings = layers(config_file=toml('[namespaces.default]\nrule = "public"\n'))
    assert settings.namespaces["default"].rule == "public"


def test_namespace_env_merges_with_file(toml: Callable[..., Path]) -> None:
    """An environment variable for one namespace key merges with that namespace's file keys."""
    path = toml('[namespaces.orders]\nrule = "webhook"\nurl = "http://h/authorize"\n')
    settings = layers(environ={"TIDINGS_NAMESPACES__ORDERS__TIMEOUT": "0.5"}, config_file=path)
    assert settings.namespaces["orders"].rule == "webhook"
    assert settings.namespaces["orders"].timeout == 0.5


# -- dev mode and cross-field checks ------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "dev"),
    [
        ({}, True),
        ({"auth": {"secret": SECRET}}, False),
        ({"server": {"mode": "development"}, "auth": {"secret": SECRET}}, True),
        ({"server": {"mode": "production"}, "auth": {"secret": SECRET}}, False),
        ({"auth": {"algorithms": ["RS256"], "jwks_url": "https://idp/jwks"}}, False),
    ],
)
def test_dev_mode(overrides: dict[str, Any], dev: bool) -> None:
    """Development mode is explicit, or automatic when no signing key is configured."""
    settings = load(overrides)
    assert settings.dev_mode is dev
    assert settings.console_enabled is dev


@pytest.mark.parametrize(("enabled", "expected"), [("on", True), ("off", False)])
def test_console_setting_overrides_mode(enabled: str, expected: bool) -> None:
    """console.enabled on/off wins over the development-mode default."""
    assert load({"console": {"enabled": enabled}}).console_enabled is expected
    production = load({"console": {"enabled": enabled}, "auth": {"secret": SECRET}})
    assert production.console_enabled is expected


def test_secret_length_boundary() -> None:
    """Outside development mode the HMAC secret needs at least 32 bytes."""
    assert load({"auth": {"secret": "x" * 32}}).auth.secret == "x" * 32
    assert load({"auth": {"secret": "\u00e9" * 16}}).auth.secret == "\u00e9" * 16  # 32 bytes
    error = error_of({"auth": {"secret": "x" * 31}})
    assert error.key == "auth.secret"
    assert "32" in error.reason
    assert "x" * 31 not in str(error)


def test_short_secret_allowed_in_dev_mode() -> None:
    """An explicit development mode accepts a short secret."""
    assert load({"server": {"mode": "development"}, "auth": {"secret": "short"}}).dev_mode


def test_secret_required_in_production() -> None:
    """Production mode with HS* and no secret names auth.secret."""
    assert error_of({"server": {"mode": "production"}}).key == "auth.secret"


def test_asymmetric_algorithms_need_a_key_in_production() -> None:
    """RS*/ES* outside development mode need a PEM file or a JWKS URL."""
    error = error_of({"server": {"mode": "production"}, "auth": {"algorithms": ["RS256"]}})
    assert error.key == "auth.public_key_file"


def test_public_key_file_must_exist(tmp_path: Path) -> None:
    """A configured public key file that does not exist names auth.public_key_file."""
    missing = tmp_path / "nope.pem"
    error = error_of({"auth": {"algorithms": ["RS256"], "public_key_file": str(missing)}})
    assert error.key == "auth.public_key_file"
    pem = tmp_path / "key.pem"
    pem.write_text("-----BEGIN PUBLIC KEY-----\n", encoding="utf-8")
    assert load(
        {"auth": {"algorithms": ["RS256"], "public_key_file": str(pem)}}
    ).auth.public_key_file == str(pem)


def test_workers_need_redis() -> None:
    """More than one worker with the memory broker names workers; Redis is accepted."""
    assert error_of({"workers": 2}).key == "workers"
    settings = load({"workers": 2, "broker": {"url": "redis://127.0.0.1:6379/0"}})
    assert settings.workers == 2


def test_tls_pair(tmp_path: Path) -> None:
    """tls_cert and tls_key must be set together and name existing files."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("cert", encoding="utf-8")
    key.write_text("key", encoding="utf-8")
    assert error_of({"server": {"tls_cert": str(cert)}}).key == "server.tls_key"
    assert error_of({"server": {"tls_key": str(key)}}).key == "server.tls_key"
    missing = str(tmp_path / "missing.pem")
    assert error_of({"server": {"tls_cert": missing, "tls_key": str(key)}}).key == "server.tls_cert"
    assert error_of({"server": {"tls_cert": str(cert), "tls_key": missing}}).key == "server.tls_key"
    settings = load({"server": {"tls_cert": str(cert), "tls_key": str(key)}})
    assert settings.server.tls_cert == str(cert)


@pytest.mark.parametrize("url", ["", "ftp://h/auth", "127.0.0.1:9000/authorize"])
def test_webhook_needs_http_url(url: str) -> None:
    """A webhook namespace without an http(s) URL names namespaces.<ns>.url."""
    error = error_of({"namespaces": {"orders": {"rule": "webhook", "url": url}}})
    assert error.key == "namespaces.orders.url"


@pytest.mark.parametrize("name", ["my ns", "News", "9lives", "a" * 33, "tenant:acme"])
def test_namespace_no_channel_can_name_is_refused(name: str) -> None:
    """A namespace key outside the channel grammar is refused, naming namespaces.<name>."""
    error = error_of({"namespaces": {name: {"rule": "public"}}})
    assert error.key == f"namespaces.{name}"


# -- errors name the key ------------------------------------------------------------------


def test_cluster_sentinel_urls_and_ack_replicas_are_accepted() -> None:
    """The cluster and Sentinel URL forms load, and ack_replicas is "auto" or a count."""
    settings = load({"broker": {"url": "redis+cluster://a:7000,b:7001"}})
    assert settings.broker.url.startswith("redis+cluster://")
    assert settings.broker.ack_replicas == "auto"
    settings = load({"broker": {"url": "redis+sentinel://s1,s2/svc/1", "ack_replicas": 2}})
    assert settings.broker.ack_replicas == 2


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"bogus": 1}, "bogus"),
        ({"limits": {"max_subs": 3}}, "limits.max_subs"),
        ({"limits": {"max_subscriptions": "many"}}, "limits.max_subscriptions"),
        ({"limits": {"max_subscriptions": -1}}, "limits.max_subscriptions"),
        ({"limits": {"max_subscriptions": 1.5}}, "limits.max_subscriptions"),
        ({"limits": {"commands_per_second": 0}}, "limits.commands_per_second"),
        ({"limits": 5}, "limits"),
        ({"logging": {"level": "verbose"}}, "logging.level"),
        ({"logging": {"format": "xml"}}, "logging.format"),
        ({"server": {"path": "ws"}}, "server.path"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"server": {"port": -1}}, "server.port"),
        ({"server": {"mode": "test"}}, "server.mode"),
        ({"server": {"heartbeat_interval": 0}}, "server.heartbeat_interval"),
        ({"server": {"heartbeat_timeout": -1}}, "server.heartbeat_timeout"),
        ({"auth": {"algorithms": ["HS999"]}}, "auth.algorithms"),
        ({"auth": {"algorithms": ["none"]}}, "auth.algorithms"),
        ({"auth": {"algorithms": []}}, "auth.algorithms"),
        ({"auth": {"leeway": -1}}, "auth.leeway"),
        ({"api": {"keys": "abc"}}, "api.keys"),
        ({"broker": {"url": "http://x"}}, "broker.url"),
        ({"broker": {"url": "redis+cluster://a:1/3"}}, "broker.url"),
        ({"broker": {"url": "redis+sentinel://s1:26379"}}, "broker.url"),
        ({"broker": {"ack_replicas": -1}}, "broker.ack_replicas"),
        ({"broker": {"ack_replicas": "all"}}, "broker.ack_replicas"),
        ({"namespaces": {"news": {"rule": "open"}}}, "namespaces.news.rule"),
        ({"namespaces": {"news": {"bogus": 1}}}, "namespaces.news.bogus"),
        ({"namespaces": {"news": 5}}, "namespaces.news"),
        ({"console": {"enabled": "yes"}}, "console.enabled"),
        ({"workers": 0}, "workers"),
        ({"workers": 257}, "workers"),
    ],
)
def test_validation_errors_name_the_key(overrides: dict[str, Any], key: str) -> None:
    """Unknown keys, wrong types and out-of-range values raise ConfigError naming the key."""
    error = error_of(overrides)
    assert error.key == key
    assert error.reason
    assert str(error).startswith(f"{key}: ")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[limits]\nmax_subscriptions = -5\n", "limits.max_subscriptions"),
        ('[limits]\nmax_subscriptions = "ten"\n', "limits.max_subscriptions"),
        ("[limits]\nmax_subscription = 5\n", "limits.max_subscription"),
        ("[bogus]\nx = 1\n", "bogus"),
        ('[server]\nport = "http"\n', "server.port"),
    ],
)
def test_file_errors_name_the_key(toml: Callable[..., Path], text: str, key: str) -> None:
    """Bad values in the TOML file name the key too."""
    assert error_of(config_file=toml(text)).key == key


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("TIDINGS_LIMITS__MAX_SUBSCRIPTIONS", "-1", "limits.max_subscriptions"),
        ("TIDINGS_LIMITS__MAX_SUBSCRIPTIONS", "many", "limits.max_subscriptions"),
        ("TIDINGS_LIMITS__BOGUS", "1", "limits.bogus"),
        ("TIDINGS_SERVER__PORTT", "8001", "server.portt"),
        ("TIDINGS_NAMESPACES__NEWS__RULEE", "public", "namespaces.news.rulee"),
        ("TIDINGS_SERVER__PORT", "eighty", "server.port"),
        ("TIDINGS_AUTH__PERSONAL_CHANNEL", "maybe", "auth.personal_channel"),
        ("TIDINGS_WORKERS", "4", "workers"),
    ],
)
def test_environment_errors_name_the_key(variable: str, value: str, key: str) -> None:
    """Bad values from the environment name the configuration key."""
    assert error_of(environ={variable: value}, require_auth=False).key == key


@pytest.mark.parametrize("variable", ["TIDINGS_LIMITS____X", "TIDINGS_LIMITS__"])
def test_malformed_variable_names(variable: str) -> None:
    """A malformed variable name inside a known section is an error naming the variable."""
    error = error_of(environ={variable: "1"})
    assert error.key == variable


def test_conflicting_variables() -> None:
    """A variable for a namespace and one for a key inside it cannot both be set."""
    error = error_of(
        environ={"TIDINGS_NAMESPACES__NEWS": "5", "TIDINGS_NAMESPACES__NEWS__RULE": "public"}
    )
    assert error.key in {"TIDINGS_NAMESPACES__NEWS__RULE", "namespaces.news"}


#: Variables that start with TIDINGS_ without being settings, and whether they look like
#: a mistyped setting (and so are worth a warning).
STRAY_VARIABLES = {
    "TIDINGS_KEY": False,
    "tidings_key": False,
    "TIDINGS_URL": False,
    "TIDINGS_": False,
    "TIDINGS_REQUIRE_REDIS": False,
    "TIDINGS_REQUIRE_BROWSER": False,
    "TIDINGS_CONFIG_DIR": False,
    "TIDINGS_BROKER_URL": True,
    "TIDINGS_SERVER": True,
    "TIDINGS_API_KEY": True,
    "TIDINGS_SERVR__PORT": True,
    "TIDINGS_WORKERS__COUNT": True,
    "TIDINGS___PORT": True,
}


def test_stray_variables_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    """TIDINGS_ variables that are not TIDINGS_<SECTION>__<KEY> or a top-level key are
    ignored; only lookalikes of settings get a warning, naming them but not their value."""
    caplog.set_level("WARNING", logger="tidings.config")
    environ = {name: f"STRAYVALUE{index}" for index, name in enumerate(STRAY_VARIABLES)}
    settings = layers(environ={**environ, "TIDINGS_SERVER__PORT": "9002"})
    assert settings.server.port == 9002
    assert settings.broker.url == "memory://" and settings.api.keys == ()
    assert settings.model_dump(exclude={"server"}) == layers().model_dump(exclude={"server"})
    warned = [record.getMessage() for record in caplog.records]
    assert not any("STRAYVALUE" in message for message in warned), warned
    for name, lookalike in STRAY_VARIABLES.items():
        mentioned = any(f" {name} " in message for message in warned)
        assert mentioned is lookalike, (name, warned)
    assert len(warned) == sum(STRAY_VARIABLES.values())
    hint = next(message for message in warned if "TIDINGS_BROKER_URL" in message)
    assert "did you mean TIDINGS_BROKER__URL?" in hint


def test_documented_names_are_read() -> None:
    """The top-level key TIDINGS_WORKERS and the nested namespace keys are settings."""
    settings = layers(
        environ={
            "TIDINGS_WORKERS": "3",
            "TIDINGS_BROKER__URL": "redis://r:6379/0",
            "TIDINGS_NAMESPACES__CHAT__RULE": "public",
        }
    )
    assert settings.workers == 3
    assert settings.broker.url == "redis://r:6379/0"
    assert settings.namespaces["chat"].rule == "public"


def test_flag_error_names_the_key_even_with_valid_lower_layers(toml: Callable[..., Path]) -> None:
    """A bad flag value is reported even when the file and environment are fine."""
    path = toml("[server]\nport = 8001\n")
    error = error_of({"server": {"port": "x"}}, {"TIDINGS_SERVER__PORT": "8002"}, path)
    assert error.key == "server.port"


def test_toml_syntax_error(toml: Callable[..., Path]) -> None:
    """A file that is not valid TOML is a ConfigError about --config naming the file."""
    path = toml("[server\nport = 8000\n")
    error = error_of(config_file=path)
    assert error.key == "--config"
    assert "TOML" in error.reason
    assert str(path) in error.reason


def test_missing_file(tmp_path: Path) -> None:
    """A configuration file that cannot be read is a ConfigError about --config."""
    missing = tmp_path / "absent.toml"
    error = error_of(config_file=missing)
    assert error.key == "--config"
    assert str(missing) in error.reason
    error = error_of(environ={"TIDINGS_CONFIG": str(missing)})
    assert error.key == "--config"


def test_settings_are_frozen() -> None:
    """The settings object cannot be changed once built."""
    settings = load()
    with pytest.raises(ValueError):
        settings.workers = 3
    with pytest.raises(ValueError):
        settings.limits.max_subscriptions = 3


def test_real_environment_is_used_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an environ argument, load_settings reads os.environ."""
    monkeypatch.setenv("TIDINGS_HISTORY__SIZE", "17")
    monkeypatch.setenv("TIDINGS_AUTH__SECRET", SECRET)
    monkeypatch.delenv("TIDINGS_CONFIG", raising=False)
    assert load_settings().history.size == 17


# -- development mode is asked for ---------------------------------------------------------


def test_a_file_without_auth_is_production(toml: Callable[..., Path]) -> None:
    """A configuration file that lacks [auth] does not start a development server: it
    is production, and the missing secret names auth.secret."""
    error = error_of(config_file=toml("[server]\nport = 8100\n"))
    assert error.key == "auth.secret"
    assert "production" in error.reason
    assert error_of(config_file=toml("")).key == "auth.secret"


def test_environment_settings_alone_are_production() -> None:
    """Any TIDINGS_* setting means the server was configured: production mode."""
    assert error_of(environ={"TIDINGS_LOGGING__LEVEL": "debug"}).key == "auth.secret"
    settings = load(environ={"TIDINGS_LOGGING__LEVEL": "debug", "TIDINGS_AUTH__SECRET": SECRET})
    assert not settings.dev_mode and settings.server.mode == "production"
    assert not settings.console_enabled


def test_only_no_configuration_at_all_is_development() -> None:
    """Nothing configured (flags such as --port and --broker are not configuration) and
    stray TIDINGS_ variables that are not settings: development mode, resolved."""
    settings = load(
        {"server": {"port": 9000}, "broker": {"url": "memory://"}},
        {"TIDINGS_KEY": "mine", "TIDINGS_REQUIRE_REDIS": "1"},
    )
    assert settings.dev_mode and settings.server.mode == "development"


def test_explicit_development_mode_without_a_secret(toml: Callable[..., Path]) -> None:
    """server.mode = "development" in a file or the environment asks for development
    mode, secret or not."""
    assert load(config_file=toml('[server]\nmode = "development"\n')).dev_mode
    assert load(environ={"TIDINGS_SERVER__MODE": "development"}).dev_mode
    assert (
        load(environ={"TIDINGS_SERVER__MODE": "auto", "TIDINGS_AUTH__SECRET": SECRET}).server.mode
        == "production"
    )


def test_settings_built_directly_with_auto_are_production() -> None:
    """Settings not made by load_settings never fall into development mode."""
    assert not Settings().dev_mode


# -- strict types ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('[server]\nport = "8106"\n', "server.port", "must be an integer"),
        ("[server]\nport = 8106.0\n", "server.port", "must be an integer"),
        ('[auth]\npersonal_channel = "yes"\n', "auth.personal_channel", "must be true or false"),
        ("[auth]\npersonal_channel = 1\n", "auth.personal_channel", "must be true or false"),
        (
            '[server]\npermessage_deflate = "on"\n',
            "server.permessage_deflate",
            "must be true or false",
        ),
        (
            '[server]\nallowed_origins = "https://a"\n',
            "server.allowed_origins",
            "must be a list of strings",
        ),
        ("[api]\nkeys = [1, 2]\n", "api.keys", "must be a list of strings"),
        ('[server]\nheartbeat_interval = "5"\n', "server.heartbeat_interval", "must be a number"),
        ("[server]\nheartbeat_interval = inf\n", "server.heartbeat_interval", "must be a number"),
        ("[server]\nhost = 127\n", "server.host", "must be a string"),
        ('[broker]\nack_replicas = "2"\n', "broker.ack_replicas", 'must be "auto" or an integer'),
        (
            '[logging]\nlevel = "loud"\n',
            "logging.level",
            'must be one of "debug", "info", "warning", "error"',
        ),
        ("[server]\nportt = 1\n", "server.portt", "unknown key"),
        ("[bogus]\nx = 1\n", "bogus", "unknown key"),
        ("limits = 5\n", "limits", "must be a table"),
        ('workers = "2"\n', "workers", "must be an integer"),
        ("[server]\nport = 70000\n", "server.port", "must be at most 65535"),
        ("[history]\nttl = 0\n", "history.ttl", "must be more than 0 ("),
        ("[auth]\nalgorithms = []\n", "auth.algorithms", "must name at least one of"),
    ],
)
def test_file_values_must_have_their_documented_types(
    toml: Callable[..., Path], text: str, key: str, reason: str
) -> None:
    """TOML values are not coerced: a wrong type or range names the key, in the project's
    words and the file's name, never the validation library's."""
    path = toml(text)
    error = error_of(config_file=path, require_auth=False)
    assert error.key == key
    assert error.reason.startswith(reason), error.reason
    assert str(path) in error.reason
    for words in ("Input should", "Extra inputs", "valid tuple", "validation error"):
        assert words not in error.reason


@pytest.mark.parametrize(
    ("text", "flags", "key"),
    [
        ('[server]\nport = "eighty"\n', {"server": {"port": 8108}}, "server.port"),
        ("[server]\nport = 99999\n", {"server": {"port": 8108}}, "server.port"),
        ('[broker]\nurl = "ftp://x"\n', {"broker": {"url": "memory://"}}, "broker.url"),
        ('workers = "4"\n', {"workers": 1}, "workers"),
    ],
)
def test_the_file_is_checked_before_flags_apply(
    toml: Callable[..., Path], text: str, flags: dict[str, Any], key: str
) -> None:
    """A bad file value is an error even where a flag overrides it."""
    assert error_of(flags, config_file=toml(text), require_auth=False).key == key


def test_an_environment_value_is_checked_before_flags_apply() -> None:
    """A bad environment value is an error even where a flag overrides it, and the
    message names the variable."""
    error = error_of(
        {"server": {"port": 8108}}, {"TIDINGS_SERVER__PORT": "eighty"}, require_auth=False
    )
    assert error.key == "server.port"
    assert error.reason == "must be an integer (from TIDINGS_SERVER__PORT)"
    error = error_of(
        {"limits": {"max_subscriptions": 5}},
        {"TIDINGS_LIMITS__MAX_SUBSCRIPTIONS": "-1"},
        require_auth=False,
    )
    assert error.key == "limits.max_subscriptions"
    assert error.reason == "must be at least 0 (from TIDINGS_LIMITS__MAX_SUBSCRIPTIONS)"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("false", False), ("False", False), ("0", False)],
)
def test_environment_booleans(value: str, expected: bool) -> None:
    """Booleans from the environment are true/false (any case) or 1/0."""
    settings = layers(environ={"TIDINGS_AUTH__PERSONAL_CHANNEL": value})
    assert settings.auth.personal_channel is expected


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("TIDINGS_AUTH__PERSONAL_CHANNEL", "yes", "must be true or false"),
        ("TIDINGS_SERVER__PORT", "80.5", "must be an integer"),
        ("TIDINGS_SERVER__PORT", "8_000", "must be an integer"),
        ("TIDINGS_SERVER__HEARTBEAT_INTERVAL", "soon", "must be a number"),
        ("TIDINGS_SERVER__HEARTBEAT_INTERVAL", "nan", "must be a number"),
        ("TIDINGS_BROKER__ACK_REPLICAS", "all", 'must be "auto" or an integer'),
        ("TIDINGS_SERVER__PORTT", "1", "unknown key"),
    ],
)
def test_environment_values_are_parsed_per_type(variable: str, value: str, reason: str) -> None:
    """Environment strings are parsed by the key's type; what does not parse names the
    key and the variable."""
    error = error_of(environ={variable: value}, require_auth=False)
    assert error.reason == f"{reason} (from {variable})"


def test_environment_numbers_and_union_values() -> None:
    """Integers, numbers and "auto"-or-integer keys parse from their text."""
    settings = layers(
        environ={
            "TIDINGS_SERVER__PORT": " 8101 ",
            "TIDINGS_SERVER__HEARTBEAT_INTERVAL": "7",
            "TIDINGS_BROKER__ACK_REPLICAS": "2",
        }
    )
    assert settings.server.port == 8101
    assert settings.server.heartbeat_interval == 7.0
    assert settings.broker.ack_replicas == 2
    assert layers(environ={"TIDINGS_BROKER__ACK_REPLICAS": "auto"}).broker.ack_replicas == "auto"


@pytest.mark.parametrize(
    ("source", "key"),
    [
        ({"TIDINGS_SERVER__HOST": ""}, "server.host"),
        ({"TIDINGS_SERVER__HOST": " "}, "server.host"),
        ({"TIDINGS_SERVER__INTERNAL_HOST": ""}, "server.internal_host"),
    ],
)
def test_an_empty_host_is_an_error_not_every_interface(source: dict[str, str], key: str) -> None:
    """An empty host (an unset variable in a compose file) would listen on every
    interface; it is an error naming the key and the way to ask for that."""
    error = error_of(environ=source, require_auth=False)
    assert error.key == key
    assert "0.0.0.0" in error.reason
    with pytest.raises(ConfigError, match=r"server\.host"):
        load_settings(overrides={"server": {"host": ""}}, environ={}, require_auth=False)
