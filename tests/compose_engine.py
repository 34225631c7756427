"""Test tools for the compose stacks run for real (tests/test_compose_e2e.py, tests/test_compose_scale_e2e.py):
a Docker engine with compose v2 and the base images, or a skip with the reason (a failure under
FEDMQ_REQUIRE_COMPOSE=1, which .ci/run sets); a copy of the checkout as a clone has it; the environment
compose runs in; a project brought down with everything it made, whatever happened."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = os.environ.get("FEDMQ_REQUIRE_COMPOSE") == "1"


def unavailable(reason: str):
    """Skip with `reason`, or fail where a real engine is required."""
    if REQUIRED:
        pytest.fail(f"FEDMQ_REQUIRE_COMPOSE=1 but {reason}")
    pytest.skip(reason)


def run(cmd, *, cwd, env=None, timeout=120, check=True) -> subprocess.CompletedProcess:
    """`cmd` (a list, or a string for bash), its output captured; with `check`, a non-zero exit fails showing it."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          shell=isinstance(cmd, str), executable="/bin/bash" if isinstance(cmd, str) else None)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def require_engine() -> str:
    """The engine's version once an engine, compose v2 and the base images are there (else `unavailable`).

    The base images are the real ones where a registry was reachable, else scripts/docker-standins'
    local stand-ins (built once per machine, shared by every compose test)."""
    if shutil.which("docker") is None:
        unavailable("no docker client (scripts/docker-engine installs Docker on Debian)")
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        unavailable("no Docker engine answers (scripts/docker-engine starts one): "
                    + (info.stderr.strip().splitlines() or ["?"])[-1])
    version = subprocess.run(["docker", "compose", "version", "--short"], capture_output=True, text=True, timeout=30)
    if version.returncode != 0 or not re.match(r"v?2\.", version.stdout.strip()):
        unavailable("docker compose v2 is missing (scripts/docker-engine installs it)")
    proc = subprocess.run([str(ROOT / "scripts" / "docker-standins")], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        unavailable(f"no base images: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return info.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_checkout(dest: Path) -> None:
    """The files a clone would have (tracked, plus new ones not ignored): no .venv, no credentials."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True, timeout=60).stdout.split(b"\0")
    for rel in filter(None, (p.decode() for p in listed)):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def demo_image_ids() -> dict[str, str]:
    """FEDMQ_UID/FEDMQ_GID as deploy/check_host.py sets them for the compose demo on this host: the tier's
    image built with the same build args shares the coordinator image's layers (docker/tier.Dockerfile)."""
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        from check_host import image_ids
    finally:
        sys.path.remove(str(ROOT / "deploy"))
    uid, gid = image_ids()
    return {"FEDMQ_UID": str(uid), "FEDMQ_GID": str(gid)}


def containers(compose: list[str], *, cwd: Path, env: dict[str, str]) -> list[dict]:
    """`compose ps`'s rows (Service, State, Health, ...), whichever JSON form this compose version prints."""
    out = run([*compose, "ps", "--format", "json"], cwd=cwd, env=env).stdout
    return json.loads(out) if out.lstrip().startswith("[") else [json.loads(l) for l in out.splitlines() if l.strip()]


def compose_env(**settings: str) -> dict[str, str]:
    """This process's environment as a newcomer's shell would have it for compose: `python` is fedmq's venv,
    the classic builder (BuildKit may want a registry for the base image's metadata), no COMPOSE_FILE and
    no FEDMQ_* of ours, then `settings`."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["DOCKER_BUILDKIT"] = "0"
    env.pop("COMPOSE_FILE", None)
    for name in list(env):
        if name.startswith("FEDMQ_"):
            env.pop(name)
    env.update(settings)
    return env


@contextlib.contextmanager
def down_after(compose: list[str], *, cwd: Path, env: dict[str, str]):
    """Run the body against compose project `compose` (e.g. ["docker", "compose", "-p", NAME, "-f", FILE]):
    its services' last log lines printed when the body fails, and `down --volumes` at the end in any case."""
    try:
        yield
    except BaseException:
        logs = subprocess.run([*compose, "logs", "--no-color", "--tail", "40"], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=120)
        print(logs.stdout[-12000:], logs.stderr[-2000:])
        raise
    finally:
        subprocess.run([*compose, "down", "--volumes", "--remove-orphans", "--timeout", "20"], cwd=cwd, env=env,
                       capture_output=True, timeout=300)
