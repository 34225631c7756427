#!/usr/bin/env python3
"""Make .env fit this host before `docker compose up`: the images' uid/gid, and the host ports.

    python deploy/check_host.py [--env .env]

- FEDMQ_UID/FEDMQ_GID: your uid/gid, so the containers can read the 0600 secret files compose
  mounts unchanged; as root, a fixed non-root uid (10001) instead, given the secret files, so
  no image runs as uid 0.
- FEDMQ_BROKER_PORT, FEDMQ_BROKER_TLS_PORT, FEDMQ_METRICS_PORT, FEDMQ_BROKER_WS_PORT, FEDMQ_WEB_PORT: each must be free on the address
  compose publishes it on; a taken one (a mosquitto already on the host holds 1883) is one line
  naming the variable to change, exit 1, before any container is created.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE_UID = 10001  # the images' user when the host user is root
PORTS = (  # (variable, its default, the variable holding the address it is published on, that default)
    ("FEDMQ_BROKER_PORT", 1883, None, "127.0.0.1"),
    ("FEDMQ_BROKER_TLS_PORT", 8883, "FEDMQ_BROKER_TLS_BIND", "127.0.0.1"),
    ("FEDMQ_METRICS_PORT", 9100, None, "127.0.0.1"),
    ("FEDMQ_BROKER_WS_PORT", 9001, None, "127.0.0.1"),  # MQTT over WebSockets (the web view's page)
    ("FEDMQ_WEB_PORT", 8080, None, "127.0.0.1"),  # the web view
)


def image_ids() -> tuple[int, int]:
    """The uid/gid the images are built with on this host: yours, or SERVICE_UID as root (no image runs as 0)."""
    return (SERVICE_UID, SERVICE_UID) if os.getuid() == 0 else (os.getuid(), os.getgid())


def read_env(path: Path) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^([A-Z_][A-Z0-9_]*)=(.*)$", path.read_text(), re.M))


def set_env(path: Path, values: dict[str, str]) -> None:
    text = path.read_text()
    for key, value in values.items():
        text, n = re.subn(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
        if not n:
            text += f"{key}={value}\n"
    path.write_text(text)


def taken(address: str, port: int) -> str | None:
    """None if `port` can be bound on `address`, else why not."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        try:
            s.bind((address, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default=str(ROOT / ".env"), help="the compose .env file (default: .env)")
    p.add_argument("--secrets", default=str(ROOT / "deploy" / "credentials" / "secrets"),
                   help="the secret files compose mounts (default: deploy/credentials/secrets)")
    args = p.parse_args(argv)
    env_path = Path(args.env)
    if not env_path.is_file():
        print(f"check_host: {env_path} not found: cp .env.example .env first", file=sys.stderr)
        return 2
    uid, gid = image_ids()
    if os.getuid() == 0:  # never an image running as root: a fixed service uid that owns the secrets
        for secret in Path(args.secrets).glob("*.password"):
            os.chown(secret, uid, gid)
    set_env(env_path, {"FEDMQ_UID": str(uid), "FEDMQ_GID": str(gid)})
    env = {**read_env(env_path), **{k: v for k, v in os.environ.items() if k.startswith("FEDMQ_")}}
    for var, default, bind_var, bind_default in PORTS:
        port = int(env.get(var) or default)
        address = (env.get(bind_var) if bind_var else None) or bind_default
        why = taken(address, port)
        if why:
            print(f"check_host: port {port} ({var}) is taken on {address} ({why}; a mosquitto on this host holds "
                  f"1883): set {var} in {env_path.name} to a free port", file=sys.stderr)
            return 1
    print(f"check_host: {env_path.name}: uid {uid}, gid {gid}; ports free")
    return 0


if __name__ == "__main__":
    sys.exit(main())
