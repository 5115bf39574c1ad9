"""The deployment kit's files: the Dockerfile's install steps run into a fresh virtual
environment, compose and the image agree with the settings, the systemd unit passes
``systemd-analyze verify``, and the Kubernetes manifests pass ``kubernetes-validate``
in strict mode (schemas shipped with the package, nothing fetched)."""

from __future__ import annotations

import asyncio
import configparser
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml

from deploy_support import REPO, free_port, until
from helpers import API_KEY, SECRET
from tidings.config import ServerSettings, Settings, _setting_path, load_settings
from tidings.errors import ConfigError
from timeouts import scaled

pytestmark = pytest.mark.timeout(120)

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "deploy" / "compose.yaml"
IMAGE_CONFIG = REPO / "deploy" / "docker" / "tidings.toml"
HOST_CONFIG = REPO / "deploy" / "tidings.toml"
UNIT = REPO / "deploy" / "systemd" / "tidings.service"
KUBERNETES = REPO / "deploy" / "kubernetes"
#: Not a setting, but read by ``load_settings`` as the configuration file's path.
CONFIG_VARIABLE = "TIDINGS_CONFIG"


# -- Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def _ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves ``relative`` out of the build context (its patterns
    match whole paths, ``**`` any number of directories; no ``!`` exceptions used)."""
    parts = relative.split("/")
    for pattern in patterns:
        regex = fnmatch.translate(pattern).replace(".*.*/", "(?:.*/)?")
        # A pattern matching a directory leaves out everything below it.
        if any(re.match(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            return True
    return False


def _build_context() -> Iterator[Path]:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "exceptions are not handled here"
    for copied in _copied_sources():
        root = REPO / copied
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if path.is_file() and not _ignored(str(path.relative_to(REPO)), patterns):
                yield path


def _copied_sources() -> list[str]:
    """The build-context paths the Dockerfile's COPY instructions take (not --from)."""
    sources = []
    for word, rest in dockerfile_instructions():
        if word == "COPY" and not rest.startswith("--from"):
            *items, _ = shlex.split(rest)
            sources.extend(items)
    return sources


def test_dockerfile_is_multi_stage_non_root_with_a_health_check() -> None:
    """Two stages on a slim Python base, a numeric non-root USER, `tidings serve` as
    entrypoint, the configuration file by TIDINGS_CONFIG, and a HEALTHCHECK."""
    instructions = dockerfile_instructions()
    words = [word for word, _ in instructions]
    assert words.count("FROM") == 2
    args = dict(rest.split("=", 1) for word, rest in instructions if word == "ARG")
    assert "slim" in args["PYTHON_IMAGE"]
    user = next(rest for word, rest in instructions if word == "USER")
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), user
    entrypoint = next(rest for word, rest in instructions if word == "ENTRYPOINT")
    assert yaml.safe_load(entrypoint) == ["tidings", "serve"]
    assert dockerfile_env()[CONFIG_VARIABLE] == "/etc/tidings/tidings.toml"
    assert "HEALTHCHECK" in words and ("STOPSIGNAL", "SIGTERM") in instructions


def test_dockerignore_keeps_what_the_image_copies_and_drops_the_rest() -> None:
    """Every file the COPY instructions need is in the build context; the virtualenv,
    tests, caches and egg-info are not."""
    context = {str(path.relative_to(REPO)) for path in _build_context()}
    for needed in (
        "pyproject.toml",
        "README.md",
        "src/tidings/cli.py",
        "src/tidings/static/console.js",
        "deploy/docker/install.sh",
        "deploy/docker/tidings.toml",
    ):
        assert needed in context, needed
    assert not any("__pycache__" in p or ".egg-info" in p for p in context)
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    for left_out in (
        ".venv/bin/python",
        "tests/server/test_cli.py",
        ".git/HEAD",
        "src/tidings/__pycache__/cli.cpython-311.pyc",
    ):
        assert _ignored(left_out, patterns), left_out


def _filtered_site_packages(tmp_path: Path) -> Path:
    """This virtualenv's dependencies without Tidings itself (nor pip and setuptools),
    as a directory of links: what ``pip install`` would have fetched for the image."""
    site = Path(sysconfig.get_paths()["purelib"])
    deps = tmp_path / "deps"
    deps.mkdir()
    own = ("tidings", "__editable__", "pip", "setuptools", "_distutils_hack", "pkg_resources")
    for entry in site.iterdir():
        if entry.name.startswith(own) or entry.suffix == ".pth":
            continue
        (deps / entry.name).symlink_to(entry)
    return deps


async def test_the_dockerfile_install_steps_make_a_working_tidings(tmp_path: Path) -> None:
    """The script the Dockerfile runs builds a wheel of the build context and installs
    it into a new virtualenv whose `tidings serve` answers the image's HEALTHCHECK
    command."""
    runs = [
        rest
        for word, rest in dockerfile_instructions()
        if word == "RUN" and "tidings-install" in rest
    ]
    assert runs == ["sh /usr/local/bin/tidings-install /src /opt/tidings"]
    assert (
        "COPY",
        "deploy/docker/install.sh /usr/local/bin/tidings-install",
    ) in dockerfile_instructions()
    # The build context as the image's build stage sees it in /src.
    source = tmp_path / "src"
    for path in _build_context():
        relative = path.relative_to(REPO)
        if relative.parts[0] == "deploy":
            continue
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, source / relative)
    venv = tmp_path / "opt-tidings"
    # Dependencies come from this virtualenv (a .pth in the new one), not the network:
    # the venv is made first so that the script's own `python -m venv` keeps the .pth.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=scaled(60))
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "_test_deps.pth").write_text(f"{_filtered_site_packages(tmp_path)}\n")
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PIP_NO_DEPS": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    env.pop("PYTHONPATH", None)
    installed = subprocess.run(
        ["sh", str(REPO / "deploy" / "docker" / "install.sh"), str(source), str(venv)],
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(90),
        check=False,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert installed.stdout.strip().endswith("tidings 0.1.0")
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import tidings; print(tidings.__file__)"],
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=True,
    )
    assert where.stdout.startswith(str(site)), where.stdout

    port, internal = free_port(), free_port()
    config = tmp_path / "tidings.toml"
    config.write_text(
        IMAGE_CONFIG.read_text()
        .replace("port = 8000", f"port = {port}")
        .replace("internal_port = 9000", f"internal_port = {internal}")
        .replace('"0.0.0.0"', '"127.0.0.1"')
    )
    serve_env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    serve_env.update(
        {
            CONFIG_VARIABLE: str(config),
            "TIDINGS_AUTH__SECRET": SECRET,
            "TIDINGS_API__KEYS": API_KEY,
            "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        }
    )
    proc = await asyncio.create_subprocess_exec(
        str(venv / "bin" / "tidings"),
        "serve",
        env=serve_env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        health = next(rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK")
        command = yaml.safe_load(health.split(" CMD ", 1)[1])
        command = [part.replace("127.0.0.1:9000", f"127.0.0.1:{internal}") for part in command]

        async def healthy() -> bool:
            check = await asyncio.create_subprocess_exec(
                *command,
                env=serve_env,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            return await check.wait() == 0

        await until(healthy, 20, "the image's HEALTHCHECK command")
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/client/tidings.js") as answer,
        ):
            assert answer.status == 200
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), scaled(15))


# -- settings named by the deployment files ------------------------------------------------


def assert_settings(variables: Mapping[str, str]) -> None:
    """Every TIDINGS_* name is TIDINGS_CONFIG or a key Settings has."""
    for name in variables:
        if not name.upper().startswith("TIDINGS_") or name == CONFIG_VARIABLE:
            continue
        path = _setting_path(name)
        assert path is not None, f"{name} is not a setting"
        model: Any = Settings
        for part in path:
            fields = model.model_fields
            assert part in fields, f"{name}: no key {part!r}"
            model = fields[part].annotation


def _interpolate(value: str) -> str:
    """Compose's ${VAR:?message} with a test value for the variable."""
    samples = {"TIDINGS_AUTH__SECRET": SECRET, "TIDINGS_API__KEYS": API_KEY}
    return re.sub(r"\$\{(\w+)(?::?[?-][^}]*)?\}", lambda m: samples[m.group(1)], value)


def test_compose_and_image_agree_with_the_settings() -> None:
    """compose.yaml's variables are settings, its configuration loads with them, and its
    container ports, the image's EXPOSE and HEALTHCHECK are the configured ports; Redis
    keeps an append-only file."""
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    nodes = {name: s for name, s in services.items() if s.get("image", "").startswith("tidings")}
    assert len(nodes) == 2
    image_env = dockerfile_env()
    assert_settings(image_env)
    expose = next(rest for word, rest in dockerfile_instructions() if word == "EXPOSE")
    for name, node in nodes.items():
        environment = {k: _interpolate(v) for k, v in node["environment"].items()}
        assert_settings(environment)
        mounts = {
            target: source
            for source, target, *_ in (volume.split(":") for volume in node["volumes"])
        }
        config = (COMPOSE.parent / mounts[image_env[CONFIG_VARIABLE]]).resolve()
        settings = load_settings(config, environ=environment)
        assert not settings.dev_mode
        assert settings.broker.url == "redis://redis:6379/0"
        assert settings.auth.secret == SECRET and settings.api.keys == (API_KEY,)
        server = settings.server
        targets = {int(port.rsplit(":", 1)[1]) for port in node["ports"]}
        assert targets == {server.port, server.internal_port}, name
        assert set(expose.split()) == {str(server.port), str(server.internal_port)}
        grace = float(node["stop_grace_period"].rstrip("s"))
        assert grace > server.drain_delay + server.shutdown_timeout
        assert node["depends_on"]["redis"]["condition"] == "service_healthy"
    health = next(rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK")
    image = load_settings(IMAGE_CONFIG, environ={"TIDINGS_AUTH__SECRET": SECRET})
    assert f"http://127.0.0.1:{image.server.internal_port}/healthz" in health
    redis_args = services["redis"]["command"]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])


def test_the_host_configuration_loads() -> None:
    """deploy/tidings.toml (the systemd unit's) loads in production mode with the secret
    from the environment and keeps the internal listener on loopback."""
    settings = load_settings(
        HOST_CONFIG, environ={"TIDINGS_AUTH__SECRET": SECRET, "TIDINGS_API__KEYS": API_KEY}
    )
    assert not settings.dev_mode
    assert settings.server.internal_host == "127.0.0.1"
    assert (
        settings.server.internal_port
        == load_settings(
            IMAGE_CONFIG, environ={"TIDINGS_AUTH__SECRET": SECRET}
        ).server.internal_port
    )
    with pytest.raises(ConfigError) as error:
        load_settings(HOST_CONFIG, environ={})
    assert error.value.key == "auth.secret"


# -- systemd ------------------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def _stop_budget(config: Path | None) -> float:
    environ = {"TIDINGS_AUTH__SECRET": SECRET}
    server = load_settings(config, environ=environ).server if config else ServerSettings()
    return server.drain_delay + server.shutdown_timeout


def test_systemd_unit_keys() -> None:
    """The unit sandboxes, raises the descriptor limit, restarts on failure, stops with
    SIGTERM and waits longer than the drain, and reads /etc/tidings/tidings.toml."""
    service = _unit()["Service"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["LimitNOFILE"] == "1048576"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["RestartPreventExitStatus"] == "2"
    stop = float(service["TimeoutStopSec"])
    assert stop > _stop_budget(None) + 5
    assert stop > _stop_budget(HOST_CONFIG) + 5
    command = shlex.split(service["ExecStart"])
    assert command[1:] == ["serve", "--config", "/etc/tidings/tidings.toml"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` reports nothing for the unit (with ExecStart pointing at
    an installed tidings), and does report a unit with an unknown key."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the keys are checked above)")
    tidings = shutil.which("tidings") or str(Path(sys.executable).parent / "tidings")
    unit = tmp_path / "tidings.service"
    unit.write_text(UNIT.read_text().replace("/opt/tidings/bin/tidings", tidings))
    result = subprocess.run(
        [analyze, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=False,
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict"))
    result = subprocess.run(
        [analyze, "verify", str(broken)],
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=False,
    )
    assert "ProtectSystm" in result.stdout + result.stderr


# -- Kubernetes ---------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    """Every document of deploy/kubernetes/*.yaml by "Kind/name"."""
    documents = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                documents[f"{document['kind']}/{document['metadata']['name']}"] = document
    return documents


def test_kubernetes_manifests_validate_strictly() -> None:
    """Every manifest passes kubernetes-validate in strict mode (and strict mode does
    reject an unknown field)."""
    version = kubernetes_validate.latest_version()
    documents = manifests()
    assert {key.split("/")[0] for key in documents} >= {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    }
    for key, document in documents.items():
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{key}: {exc.message}")
    broken = {**documents["Deployment/tidings"]}
    broken["spec"] = {**broken["spec"], "replica": 2}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def _configmap_settings(tmp_path: Path, environ: Mapping[str, str]) -> Settings:
    documents = manifests()
    path = tmp_path / "tidings.toml"
    path.write_text(documents["ConfigMap/tidings"]["data"]["tidings.toml"])
    return load_settings(path, environ=environ)


def test_kubernetes_manifests_agree_with_the_configuration(tmp_path: Path) -> None:
    """The ConfigMap's TOML loads with tidings' loader; the probes use the internal
    port (liveness /healthz, readiness /readyz), the grace period outlasts the drain,
    the Secret names real settings, and the Services and HPA point at the right things."""
    documents = manifests()
    secret = documents["Secret/tidings-secrets"]["stringData"]
    assert_settings(secret)
    settings = _configmap_settings(
        tmp_path, {"TIDINGS_AUTH__SECRET": SECRET, "TIDINGS_API__KEYS": API_KEY}
    )
    assert not settings.dev_mode and settings.broker.url.startswith("redis://")
    with pytest.raises(ConfigError) as error:  # the placeholder cannot run by mistake
        _configmap_settings(tmp_path, secret)
    assert error.value.key == "auth.secret"

    deployment = documents["Deployment/tidings"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"ws": settings.server.port, "internal": settings.server.internal_port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "internal"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "internal"}
    server = settings.server
    assert pod["terminationGracePeriodSeconds"] > server.drain_delay + server.shutdown_timeout
    assert pod["topologySpreadConstraints"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["envFrom"] == [{"secretRef": {"name": "tidings-secrets"}}]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert (
        f"{mount['mountPath']}/tidings.toml"
        == container["args"][-1]
        == dockerfile_env()[CONFIG_VARIABLE]
    )
    assert pod["securityContext"]["runAsUser"] == int(
        next(rest for word, rest in dockerfile_instructions() if word == "USER").split(":")[0]
    )
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    assert documents["Service/tidings"]["spec"]["ports"][0]["targetPort"] == "ws"
    assert documents["Service/tidings-internal"]["spec"]["ports"][0]["targetPort"] == "internal"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for key in ("Service/tidings", "Service/tidings-internal"):
        assert documents[key]["spec"]["selector"] == labels
    assert documents["PodDisruptionBudget/tidings"]["spec"]["selector"]["matchLabels"] == labels
    hpa = documents["HorizontalPodAutoscaler/tidings"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "tidings"
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "tidings_connections"


# -- docs/deployment.md -------------------------------------------------------------------


def test_the_deployment_guide_configurations_load(tmp_path: Path) -> None:
    """Every TOML block of docs/deployment.md is a valid production configuration."""
    text = (REPO / "docs" / "deployment.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert blocks
    for number, block in enumerate(blocks):
        path = tmp_path / f"block-{number}.toml"
        path.write_text(block)
        settings = load_settings(
            path, environ={"TIDINGS_AUTH__SECRET": SECRET, "TIDINGS_API__KEYS": API_KEY}
        )
        assert not settings.dev_mode and settings.server.internal_port is not None
