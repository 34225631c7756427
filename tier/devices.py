"""The tier's device credential store: one line per device, `agent:fleet:hash`, as mosquitto's passwd file
is for the single-coordinator broker. tier/auth.py checks an MQTT client's username (the agent id) and
password against it at every connect; `python -m tier.devices add` is how an operator adds a device.

The hash is PBKDF2-HMAC-SHA256 with a random salt (`pbkdf2-sha256$<iterations>$<salt>$<hash>`, base64).
`add` makes each device a random 192-bit password, so the iteration count only has to stop a stolen store
from being a list of passwords, not slow a guess at a weak one (mosquitto_passwd's default is 101 rounds of
PBKDF2-SHA512). With 1,000 iterations a whole login costs the auth service about a millisecond of CPU
(bench/results/tier_auth.json, `auth_cpu_ms_per_connect`); 20,000 cost 27 ms per check alone (timed in a loop on
the 2-core test machine at load 14): a reconnect storm of 10,000 devices would have queued for 4 minutes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from protocol.config import CliParser

log = logging.getLogger(__name__)

ITERATIONS = 1_000
# fleets: what broker/make-credentials.sh allows (topic levels and NATS subject tokens both); agent ids the
# same without '.': an agent's MQTT client id is its id, and NATS's MQTT listener refuses a client id with a '.'
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
AGENT = re.compile(r"[A-Za-z0-9_-]{1,64}")
RESERVED = ("tier",)  # the tier processes' NATS user: never a device's name


def hash_password(password: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2-sha256${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    """True when `password` matches the stored hash (constant-time compare); False for any malformed hash."""
    try:
        scheme, iterations, salt, digest = stored.split("$")
        if scheme != "pbkdf2-sha256" or not 1 <= int(iterations) <= 10_000_000:
            return False
        got = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt, validate=True), int(iterations))
        return hmac.compare_digest(got, base64.b64decode(digest, validate=True))
    except (ValueError, TypeError):
        return False


@dataclass(frozen=True)
class Device:
    agent: str
    fleet: str
    hash: str


def parse_store(text: str) -> dict[str, Device]:
    """The devices of a store file's text; ValueError naming the line for anything malformed."""
    devices: dict[str, Device] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3 or not AGENT.fullmatch(parts[0]) or not NAME.fullmatch(parts[1]) or not parts[2]:
            raise ValueError(f"line {n}: not `agent:fleet:hash` (agent: 1-64 of A-Z a-z 0-9 _ -, fleet: the same and .)")
        if parts[0] in devices:
            raise ValueError(f"line {n}: agent {parts[0]!r} is listed twice")
        devices[parts[0]] = Device(*parts)
    return devices


def render_store(devices: dict[str, Device]) -> str:
    lines = ["# fedmq tier device credentials (python -m tier.devices): agent:fleet:pbkdf2-sha256 hash"]
    return "\n".join(lines + [f"{d.agent}:{d.fleet}:{d.hash}" for d in devices.values()]) + "\n"


class Store:
    """The store file, read again whenever it changed (mtime, size, inode), so a device added or removed counts
    from its next connect without restarting anything; a file that no longer parses keeps the last good
    contents (and says why once)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple | None = None
        self.devices: dict[str, Device] = {}
        self.error: str | None = None
        self.refresh()

    def refresh(self) -> None:
        st = self.path.stat()  # FileNotFoundError: the caller says so
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self.devices = parse_store(self.path.read_text())
            self.error = None
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            self.error = f"{self.path}: {exc}"
            log.error("device store unreadable, keeping the last good one (%d devices): %s", len(self.devices),
                      self.error)

    def check(self, agent: str, password: str) -> Device | None:
        """The device `agent` if `password` is its password, else None."""
        device = self.devices.get(agent)
        return device if device is not None and check_password(password, device.hash) else None


def _write_atomic(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def add_devices(store: Path, secrets_dir: Path, fleet: str, agents: list[str]) -> list[Path]:
    """Add `agents` of `fleet` to `store`: each gets a random password in `secrets_dir/<agent>.password`
    (mode 600; an existing one is kept, so running again is harmless), and its hash in the store."""
    if not NAME.fullmatch(fleet):
        raise ValueError(f"invalid fleet {fleet!r} (1-64 of A-Z a-z 0-9 _ . -)")
    for agent in agents:
        if not AGENT.fullmatch(agent):
            raise ValueError(f"invalid agent id {agent!r} (1-64 of A-Z a-z 0-9 _ -)")
        if agent in RESERVED:
            raise ValueError(f"agent id {agent!r} is reserved")
    devices = parse_store(store.read_text()) if store.exists() else {}
    for agent in agents:
        if agent in devices and devices[agent].fleet != fleet:
            raise ValueError(f"agent {agent!r} is in fleet {devices[agent].fleet!r} (remove it first to move it)")
    secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # docs/security.md's deploy/tier-auth/devices
    written = []
    for agent in agents:
        secret = secrets_dir / f"{agent}.password"
        if not secret.exists() or not secret.read_text().strip():
            _write_atomic(secret, secrets.token_hex(24) + "\n", 0o600)
        devices[agent] = Device(agent, fleet, hash_password(secret.read_text().strip()))
        written.append(secret)
    _write_atomic(store, render_store(devices), 0o600)
    return written


def remove_devices(store: Path, agents: list[str]) -> list[str]:
    """Remove `agents` from `store` (their next connect is refused); the ones that were there."""
    devices = parse_store(store.read_text())
    gone = [a for a in agents if devices.pop(a, None) is not None]
    _write_atomic(store, render_store(devices), 0o600)
    return gone


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(
        prog="python -m tier.devices",
        description="Manage the scale-out tier's device credential store (the file tier.auth checks MQTT logins "
                    "against; a change counts from each device's next connect, nothing to restart). A device "
                    "connects with --username <agent id> --password-file <its .password file>.")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add devices (a random password each) or re-hash existing ones")
    add.add_argument("--store", required=True, type=Path, help="the store file (created if missing)")
    add.add_argument("--secrets", required=True, type=Path,
                     help="directory for each device's password file <agent>.password (mode 600; kept if present)")
    add.add_argument("--fleet", required=True, help="the devices' fleet: they may use this fleet's topics only")
    add.add_argument("agents", nargs="+", help="agent ids (the devices' --id and --username)")
    rm = sub.add_parser("remove", help="remove devices: their next connect is refused")
    rm.add_argument("--store", required=True, type=Path, help="the store file")
    rm.add_argument("agents", nargs="+", help="agent ids")
    args = parser.parse_args(argv)
    try:
        if args.command == "add":
            written = add_devices(args.store, args.secrets, args.fleet, args.agents)
            print(f"{len(written)} device(s) of fleet {args.fleet} in {args.store}; passwords in {args.secrets}/")
        else:
            gone = remove_devices(args.store, args.agents)
            print(f"removed {len(gone)} device(s) from {args.store}")
    except (ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
