"""Static checks of the container and systemd deployment (no Docker engine needed).

docker-compose.yml, docker/*.Dockerfile, .dockerignore, .env.example and deploy/ are
checked against the real code: every command must parse with fedmq's own argument parsers,
every file a Dockerfile copies or compose mounts must exist or be made by a documented
generator, and every key of deploy/agent.toml.example must be a real fedmq-agent option.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import coordinator.cli
import edge_agent.cli
from protocol.config import parse_layered

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY_README = ROOT / "deploy" / "README.md"
AGENT_TOML = ROOT / "deploy" / "agent.toml.example"
# generated, git-ignored trees -> (generator script, the command deploy/README.md must show)
GENERATED = {
    "deploy/credentials": ("broker/make-credentials.sh", "broker/make-credentials.sh deploy/credentials"),
    "deploy/data": ("deploy/make_demo_data.py", "python deploy/make_demo_data.py"),
}
DOCKERFILES = {"docker/agent.Dockerfile": "fedmq-agent", "docker/coordinator.Dockerfile": "fedmq-coordinator"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


# ---------------------------------------------------------------- helpers

def interpolate(value, env: dict | None = None):
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR} and $$, recursively; with no env,
    every variable takes its default (an unset variable without one is an error)."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        assert default is not None, f"${{{name}}} has no default in docker-compose.yml"
        return default

    parts = value.split("$$")
    return "$".join(_VAR.sub(sub, part) for part in parts)


@pytest.fixture(scope="module")
def compose() -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()))


@pytest.fixture(autouse=True)
def no_fedmq_env(monkeypatch):
    """FEDMQ_* variables of the machine running the tests must not fill in options."""
    for name in list(os.environ):
        if name.startswith("FEDMQ_"):
            monkeypatch.delenv(name)


def build_of(service: dict) -> tuple[Path, str | None]:
    """(context dir, dockerfile relative to the repo root or None for the context's Dockerfile)."""
    build = service.get("build")
    if build is None:
        return None, None
    if isinstance(build, str):
        return ROOT / build, None
    context = ROOT / build.get("context", ".")
    dockerfile = build.get("dockerfile")
    return context, (str((context / dockerfile).resolve().relative_to(ROOT)) if dockerfile else None)


def image_build(compose: dict, service: dict) -> tuple[Path, str | None]:
    """`build_of` the service that builds the image `service` runs (itself, or the one service with a
    `build` for that image: compose builds an image once per service that has one)."""
    if "build" in service:
        return build_of(service)
    builders = [s for s in compose["services"].values() if "build" in s and s.get("image") == service.get("image")]
    assert len(builders) == 1, f"image {service.get('image')!r} is built by {len(builders)} services, not one"
    assert service.get("pull_policy") == "never", f"{service.get('image')}: built here, never to be pulled"
    return build_of(builders[0])


def our_services(compose: dict, dockerfile: str) -> dict:
    return {name: s for name, s in compose["services"].items() if image_build(compose, s)[1] == dockerfile}


def command_of(service: dict) -> list[str]:
    cmd = service.get("command")
    assert cmd, "a fedmq service needs a command (its ENTRYPOINT is the console script)"
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def mounts_of(service: dict) -> list[dict]:
    """Volumes in long form: {type, source, target, read_only}."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            source, target = parts[0], parts[1]
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            out.append({"type": kind, "source": source, "target": target,
                        "read_only": len(parts) > 2 and "ro" in parts[2].split(",")})
        else:
            out.append(dict(v, read_only=bool(v.get("read_only"))))
    return out


def generated_root(path: Path) -> str | None:
    rel = path.resolve().relative_to(ROOT).as_posix()
    return next((g for g in GENERATED if rel == g or rel.startswith(g + "/")), None)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def copy_sources(path: Path) -> list[str]:
    sources = []
    for word, rest in dockerfile_instructions(path):
        if word in ("COPY", "ADD"):
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            sources += args[:-1]
    return sources


def setuptools_packages() -> list[str]:
    """The top-level directories setuptools builds from (monitor.web lies in monitor)."""
    return sorted({p.split(".")[0] for p in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]})


# ---------------------------------------------------------------- commands

def test_compose_has_the_fleet(compose):
    services = compose["services"]
    assert {"broker", "coordinator", "agent-1", "agent-2", "agent-3"} <= set(services)
    assert build_of(services["broker"])[0] == ROOT / "broker"
    assert build_of(services["coordinator"])[1] == "docker/coordinator.Dockerfile"
    for n in (1, 2, 3):
        assert image_build(compose, services[f"agent-{n}"])[1] == "docker/agent.Dockerfile"
    # each image built once (five parallel builds of two images before, as in docker-compose.scale.yml)
    images = [s["image"] for s in services.values() if "build" in s]
    assert sorted(images) == sorted(set(images)) and all(image_build(compose, s) for s in services.values())


def test_coordinator_command_parses_with_the_real_parser(compose, tmp_path):
    services = {n: s for n, s in our_services(compose, "docker/coordinator.Dockerfile").items() if "entrypoint" not in s}
    assert services
    for name, service in services.items():
        cmd = command_of(service)
        args = coordinator.cli.build_parser().parse_args(cmd)
        assert args.broker == "mqtt://broker:1883" and args.fleet == "demo"
        assert args.model == "sgd-classifier" and args.n_features == 64
        assert args.classes == ",".join(str(i) for i in range(10))
        assert args.checkpoint_dir == "/data/checkpoints"
        assert args.username == "coordinator"
        assert_password_is_a_secret(service, args.password_file)
        # the cross-field checks too, with readable stand-ins for the secret and the holdout file
        # (parse_args checks that --eval-csv exists; the service's lives on its mount)
        secret, holdout = tmp_path / "password", tmp_path / "eval.csv"
        secret.write_text("x\n")
        holdout.write_text("")
        full = coordinator.cli.parse_args(cmd + ["--password-file", str(secret), "--eval-csv", str(holdout)])
        assert full.spec.n_params == 64 * 10 + 10
        # the command's paths live on the service's mounts
        assert_on_a_mount(service, args.checkpoint_dir, writable=True)
        assert_on_a_mount(service, args.eval_csv)
        assert_on_a_mount(service, args.metrics_log, writable=True)


def test_web_view_command_parses_and_stays_on_loopback(compose, tmp_path):
    """The web service: fedmq-monitor --web from the coordinator's image, as the read-only web user."""
    import monitor.cli

    web = compose["services"]["web"]
    assert image_build(compose, web)[1] == "docker/coordinator.Dockerfile" and web["entrypoint"] == ["fedmq-monitor"]
    cmd = command_of(web)
    args = monitor.cli.build_parser().parse_args(cmd)
    assert args.web == 8080 and args.fleet == "demo" and args.username == "web" and args.web_share_login
    assert_password_is_a_secret(web, args.password_file)
    secret = tmp_path / "password"
    secret.write_text("x\n")
    full = monitor.cli.parse_args(cmd + ["--password-file", str(secret)])
    assert full.web_password == "x"
    # the page and the broker's WebSocket listener are published on the host's loopback only
    assert web["ports"] == ["127.0.0.1:8080:8080"]
    assert f"127.0.0.1:9001:9001" in compose["services"]["broker"]["ports"]
    assert args.ws_url == "ws://localhost:9001"
    assert web["depends_on"]["broker"]["condition"] == "service_healthy"


def test_agent_commands_parse_with_the_real_parser(compose, tmp_path):
    services = our_services(compose, "docker/agent.Dockerfile")
    assert len(services) == 3
    ids, sources = set(), set()
    secret = tmp_path / "password"
    secret.write_text("x\n")
    for name, service in services.items():
        cmd = command_of(service)
        args = edge_agent.cli.build_parser().parse_args(cmd)
        assert args.broker == "mqtt://broker:1883" and args.fleet == "demo"
        assert args.id == name, "agent ids are the service names (and broker users)"
        assert args.username == args.id, "the broker ACL (%u) needs username == agent id"
        assert_password_is_a_secret(service, args.password_file)
        full = edge_agent.cli.parse_args(cmd + ["--password-file", str(secret)])
        assert full.topics.update(full.id) == f"fedmq/demo/update/{name}"
        mount = assert_on_a_mount(service, args.data)
        assert mount["read_only"], f"{name}: its data partition is mounted read-only"
        ids.add(args.id)
        sources.add(Path(mount["source"]).name)
    assert len(ids) == 3 and len(sources) == 3, "each agent has its own id and its own partition"


def assert_password_is_a_secret(service: dict, password_file: str) -> None:
    assert password_file and password_file.startswith("/run/secrets/")
    names = [s if isinstance(s, str) else s.get("target", s["source"]) for s in service.get("secrets", [])]
    assert Path(password_file).name in names, f"{password_file} is not one of the service's secrets {names}"


def assert_on_a_mount(service: dict, path: str, writable: bool = False) -> dict:
    best = None
    for m in mounts_of(service):
        if path == m["target"] or path.startswith(m["target"].rstrip("/") + "/"):
            if best is None or len(m["target"]) > len(best["target"]):
                best = m
    assert best is not None, f"{path} is on no mount of the service"
    if writable:
        assert not best["read_only"] and best["type"] == "volume", f"{path} should be on a writable named volume"
    return best


# ---------------------------------------------------------------- files

def test_bind_mounts_and_secrets_exist_or_are_generated(compose, tmp_path):
    generated = {}
    paths = []
    for name, service in compose["services"].items():
        context, _ = build_of(service)
        if context is not None:
            assert context.is_dir(), f"{name}: build context {context} missing"
        for m in mounts_of(service):
            if m["type"] == "bind":
                paths.append((name, ROOT / m["source"]))
    for name, secret in compose.get("secrets", {}).items():
        assert "file" in secret, f"secret {name}: file-based secrets only (no secrets in the environment)"
        paths.append((f"secret {name}", ROOT / secret["file"]))
    for owner, path in paths:
        root = generated_root(path)
        if root is None:
            assert path.exists(), f"{owner}: {path} is committed and must exist"
        else:
            generated.setdefault(root, []).append(path.resolve().relative_to(ROOT / root))
    assert set(generated) == set(GENERATED), "compose mounts both generated trees"

    readme = DEPLOY_README.read_text()
    ignored = (ROOT / ".gitignore").read_text().split()
    for root, (script, command) in GENERATED.items():
        assert (ROOT / script).is_file(), script
        assert command in readme, f"deploy/README.md must show `{command}`"
        assert f"{root}/" in ignored, f"{root}/ must be git-ignored"
    assert ".env" in ignored


def _load_demo_data_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "deploy" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_data_script_writes_every_mounted_file(compose, tmp_path):
    out = tmp_path / "data"
    assert _load_demo_data_script().main(["--out", str(out)]) == 0
    wanted = [path.resolve().relative_to(ROOT / "deploy" / "data")
              for service in compose["services"].values()
              for m in mounts_of(service) if m["type"] == "bind"
              for path in [ROOT / m["source"]] if generated_root(path) == "deploy/data"]
    assert wanted
    for rel in wanted:
        assert (out / rel).is_file(), f"make_demo_data.py does not write {rel}"
    header = (out / "eval.csv").read_text().splitlines()[0].split(",")
    assert len(header) == 64 + 1 and header[-1] == "label", "64 features (--n-features 64) and a label"


@pytest.mark.skipif(not (shutil.which("mosquitto_passwd") and shutil.which("openssl")),
                    reason="needs mosquitto_passwd and openssl")
def test_credentials_script_writes_every_mounted_file(compose, tmp_path):
    readme = DEPLOY_README.read_text()
    line = next(l for l in readme.splitlines() if l.startswith("broker/make-credentials.sh deploy/credentials"))
    agents = shlex.split(line)[2:]
    out = tmp_path / "credentials"
    subprocess.run([str(ROOT / "broker" / "make-credentials.sh"), str(out), *agents],
                   check=True, capture_output=True, timeout=120)
    wanted = [ROOT / m["source"] for s in compose["services"].values() for m in mounts_of(s) if m["type"] == "bind"]
    wanted += [ROOT / s["file"] for s in compose["secrets"].values()]
    for path in wanted:
        if generated_root(path) == "deploy/credentials":
            rel = path.resolve().relative_to(ROOT / "deploy" / "credentials")
            assert (out / rel).exists(), f"make-credentials.sh does not make {rel}"
    for name in compose["secrets"]:
        assert (out / "secrets" / name).is_file()


def test_dockerfile_copy_sources_exist_and_cover_the_packages():
    ignored = [l.strip().rstrip("/") for l in (ROOT / ".dockerignore").read_text().splitlines()
               if l.strip() and not l.startswith("#")]
    for dockerfile in DOCKERFILES:
        sources = copy_sources(ROOT / dockerfile)
        assert sources, dockerfile
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile}: COPY {source} does not exist"
            assert source.rstrip("/") not in ignored, f"{dockerfile}: {source} is excluded by .dockerignore"
        copied = {s.rstrip("/") for s in sources}
        for package in setuptools_packages():
            assert package in copied, f"{dockerfile} does not copy package {package} (setuptools needs it)"
        assert {"pyproject.toml", "README.md"} <= copied


def test_dockerfiles_are_multiarch_nonroot_and_run_the_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for dockerfile, script in DOCKERFILES.items():
        text = (ROOT / dockerfile).read_text()
        instructions = dockerfile_instructions(ROOT / dockerfile)
        words = [w for w, _ in instructions]
        assert instructions[0] == ("FROM", "python:3.11-slim")
        assert "HEALTHCHECK" in words and "NONE" not in dict(instructions)["HEALTHCHECK"].upper().split()
        user = [rest for w, rest in instructions if w == "USER"]
        assert user and user[-1] not in ("root", "0"), f"{dockerfile} runs as root"
        assert dict(instructions)["ENTRYPOINT"] == f'["{script}"]' and script in scripts
        assert "--no-cache-dir" in text
        runs = [rest for w, rest in instructions if w == "RUN"]
        # the one architecture-specific step: piwheels as pip's extra index on linux/arm/v7 alone
        pip_step = next(r for r in runs if "pip install" in r)
        case = re.search(r'case "\$\{TARGETPLATFORM:-linux/\$\(uname -m\)\}" in (.*?) esac', pip_step)
        assert case, f"{dockerfile}: pip's extra index must depend on the platform"
        assert re.fullmatch(r'\s*linux/arm/v7\|linux/armv7l\|linux/armv8l\) \[ -z "\$PIWHEELS" \] \|\| '
                            r'export PIP_EXTRA_INDEX_URL="\$PIWHEELS" ;;\s*', case.group(1)), case.group(1)
        assert "ARG PIWHEELS=https://www.piwheels.org/simple" in text and "PIP_EXTRA_INDEX_URL=" not in text.replace(
            'export PIP_EXTRA_INDEX_URL="$PIWHEELS"', ""), f"{dockerfile}: piwheels for every platform"
        assert not re.search(r"TARGETARCH|TARGETPLATFORM|uname|dpkg --print-architecture|amd64|aarch64|armv7|armhf",
                             "\n".join(runs).replace(case.group(0), "")), \
            f"{dockerfile}: an architecture-specific step"
        assert not text.startswith("# syntax="), f"{dockerfile}: a # syntax= line makes BuildKit pull a frontend"
    assert 'pip install --no-cache-dir ".[coordinator]"' in (ROOT / "docker/coordinator.Dockerfile").read_text()
    assert "pip install --no-cache-dir ." in (ROOT / "docker/agent.Dockerfile").read_text()


def test_dockerignore_keeps_secrets_and_junk_out():
    lines = {l.strip().rstrip("/") for l in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".git", ".venv", "out", "bench/results", "deploy/credentials", "deploy/data", ".env"):
        assert entry in lines, f".dockerignore should exclude {entry}"
    assert any("__pycache__" in l for l in lines)


# ---------------------------------------------------------------- compose hygiene

def test_every_service_has_a_healthcheck_and_dependencies_are_healthy(compose):
    for name, service in compose["services"].items():
        hc = service.get("healthcheck")
        assert hc and not hc.get("disable") and hc.get("test"), f"{name} has no healthcheck"
        assert hc["test"][0] in ("CMD", "CMD-SHELL"), name
    for name in ("coordinator", "agent-1", "agent-2", "agent-3"):
        assert compose["services"][name]["depends_on"]["broker"]["condition"] == "service_healthy"
    broker_hc = compose["services"]["broker"]["healthcheck"]["test"][1]
    assert "-u health" in broker_hc and "/run/secrets/health.password" in broker_hc  # never a live monitor's login
    assert "health.password" in compose["services"]["broker"]["secrets"]


def test_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    used = {m["source"] for s in compose["services"].values() for m in mounts_of(s) if m["type"] == "volume"}
    assert used, "the broker's data and the coordinator's checkpoints are on named volumes"
    assert used <= declared, f"undeclared volumes: {used - declared}"
    assert declared <= used, f"declared but unused volumes: {declared - used}"
    targets = {m["target"]: m["source"] for m in mounts_of(compose["services"]["broker"])}
    assert targets["/mosquitto/data"] in declared
    # the broker's entrypoint installs these for uid 1883; the CA's key never reaches the broker
    assert targets["/run/fedmq/passwd"] == "./deploy/credentials/passwd"
    assert targets["/run/fedmq/acl"] == "./deploy/credentials/acl", "the generated ACL names the agents"
    certs = {t: s for t, s in targets.items() if "certs" in t}
    assert certs == {f"/run/fedmq/certs/{n}": f"./deploy/credentials/certs/{n}" for n in ("ca.crt", "server.crt", "server.key")}


def test_env_example_has_every_variable_and_no_secrets():
    path = ROOT / ".env.example"
    assert path.is_file()
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not KEY=VALUE"
            values[key.strip()] = value.strip()
    for key, value in values.items():
        assert not re.search(r"PASS|SECRET|TOKEN|KEY|CREDENTIAL", key, re.I), f".env.example: {key} looks secret"
        assert not re.fullmatch(r"[0-9a-fA-F]{16,}|[A-Za-z0-9+/=_-]{24,}", value), f".env.example: {key} looks like a password"
    raw = COMPOSE.read_text()
    used = set(_VAR.findall(raw.replace("$$", "")))
    assert {name for name, _ in used} <= set(values), "every ${VAR} in docker-compose.yml is documented in .env.example"
    assert values["FEDMQ_FLEET"] == "demo"


def test_compose_variables_change_the_commands():
    raw = yaml.safe_load(COMPOSE.read_text())
    changed = interpolate(raw, {"FEDMQ_FLEET": "greenhouse", "FEDMQ_CODEC": "int4"})
    args = edge_agent.cli.build_parser().parse_args(command_of(changed["services"]["agent-1"]))
    assert args.fleet == "greenhouse" and args.codec == "int4"
    args = coordinator.cli.build_parser().parse_args(command_of(changed["services"]["coordinator"]))
    assert args.fleet == "greenhouse"


# ---------------------------------------------------------------- systemd

def test_agent_toml_example_keys_are_real_agent_options(tmp_path):
    keys = tomllib.loads(AGENT_TOML.read_text())
    assert {"broker", "fleet", "id", "data", "codec", "local-epochs", "password-file", "ca-file"} <= set(keys)
    parser = edge_agent.cli.build_parser()
    args = parse_layered(parser, ["--config", str(AGENT_TOML)])  # unknown keys: SystemExit(2)
    for key, value in keys.items():
        assert getattr(args, key.replace("-", "_")) == value, f"agent.toml.example: {key} was not taken"
    assert not any("password" == k or k.endswith("-password") for k in keys), "no password in the TOML"
    # and the whole agent configuration passes the CLI's own checks
    # (with stand-ins for the files that exist only on the Pi)
    secret, ca = tmp_path / "password", tmp_path / "ca.crt"
    secret.write_text("x\n")
    ca.write_text("stand-in\n")
    full = edge_agent.cli.parse_args(["--config", str(AGENT_TOML), "--password-file", str(secret), "--ca-file", str(ca)])
    assert full.id == keys["id"]


def test_systemd_unit():
    unit = (ROOT / "deploy" / "fedmq-agent.service").read_text()
    settings = {}
    for line in unit.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    assert settings["ExecStart"] == ["/opt/fedmq/.venv/bin/fedmq-agent --config /etc/fedmq/agent.toml"]
    assert settings["Restart"] == ["on-failure"] and settings["RestartSec"] == ["5"]
    assert settings["User"][0] not in ("root", "0")
    assert settings["EnvironmentFile"] == ["-/etc/fedmq/agent.env"]
    assert settings["NoNewPrivileges"] == ["yes"] and settings["ProtectSystem"] == ["strict"]
    assert settings["PrivateTmp"] == ["yes"]
    data_dir = str(Path(tomllib.loads(AGENT_TOML.read_text())["data"]).parent)
    assert any(data_dir in v for v in settings["ReadWritePaths"]), "the data directory is writable"
    # W^X would break numpy/OpenBLAS in the venv; /opt must only need reading
    assert "MemoryDenyWriteExecute" not in settings
    assert all("/opt" not in v for v in settings["ReadWritePaths"])


# ---------------------------------------------------------------- host defaults (issue 22 point 6)

def test_every_published_port_defaults_to_loopback(compose):
    published = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert len(published) >= 3
    for port in published:
        text = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port['published']}:{port['target']}"
        assert text.startswith("127.0.0.1:"), f"{port!r} is published on every interface by default"


def test_the_images_refuse_to_run_as_root():
    for dockerfile in DOCKERFILES:
        text = (ROOT / dockerfile).read_text()
        assert re.search(r'if \[ "\$\{FEDMQ_UID\}" = 0 \]; then .*exit 1; fi', text), f"{dockerfile} builds for uid 0"
        assert "ARG FEDMQ_UID=10001" in text


def _check_host(env: Path, secrets: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "deploy" / "check_host.py"), "--env", str(env),
                           "--secrets", str(secrets)], capture_output=True, text=True, timeout=60)


def test_check_host_names_a_taken_port_in_one_line_and_sets_a_non_root_uid(tmp_path):
    readme = DEPLOY_README.read_text()
    assert "python deploy/check_host.py" in readme and readme.index("check_host.py") < readme.index(
        "docker compose up --build"), "deploy/README.md checks the host before compose creates any container"
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "monitor.password").write_text("x")
    env = tmp_path / ".env"
    ports = {}
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        ports["FEDMQ_BROKER_PORT"] = held.getsockname()[1]
        for var in ("FEDMQ_BROKER_TLS_PORT", "FEDMQ_METRICS_PORT"):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports[var] = s.getsockname()[1]
        text = (ROOT / ".env.example").read_text()
        for var, port in ports.items():
            text = re.sub(rf"^{var}=.*$", f"{var}={port}", text, flags=re.M)
        env.write_text(text)
        taken = _check_host(env, secrets)
    assert taken.returncode == 1, taken
    line, = taken.stderr.strip().splitlines()
    assert f"port {ports['FEDMQ_BROKER_PORT']} (FEDMQ_BROKER_PORT) is taken" in line and "set FEDMQ_BROKER_PORT" in line
    free = _check_host(env, secrets)
    assert free.returncode == 0, free
    values = dict(re.findall(r"^(FEDMQ_[UG]ID)=(\d+)$", env.read_text(), re.M))
    assert int(values["FEDMQ_UID"]) != 0 and int(values["FEDMQ_GID"]) != 0, values
    if os.getuid() == 0:  # root: the fixed service uid, which now owns the secrets it must read
        assert values["FEDMQ_UID"] == "10001" and (secrets / "monitor.password").stat().st_uid == 10001
