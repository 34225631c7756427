"""A real mosquitto (Debian package) on a free loopback port with its own config: tests and benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """Starts `mosquitto -c <generated conf>`; stop(), kill() (SIGKILL) and restart() on the same port."""

    def __init__(self, workdir: Path, *, port: int | None = None, extra_conf: str = "",
                 allow_anonymous: bool = True, persistence: bool = False) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.allow_anonymous = allow_anonymous
        self.persistence = persistence
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _write_conf(self) -> Path:
        lines = [
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "max_queued_messages 200000",
            "max_inflight_messages 1000",  # as broker/mosquitto.conf: the coordinator acks after each group commit
        ]
        if os.geteuid() == 0:
            # as root mosquitto would switch to user "mosquitto", which cannot read our temp files
            lines.append("user root")
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/", "autosave_interval 1"]
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n" + self.extra_conf + "\n")
        return conf

    def start(self, timeout: float = 10.0, *, also: tuple[int, ...] = ()) -> None:
        """Start and wait until it listens on its port and on every port in `also` (listeners of
        `extra_conf`: mosquitto opens them one after the other)."""
        conf = self._write_conf()
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        waiting = [self.port, *also]
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {self._tail()}")
            try:
                with socket.create_connection((self.host, waiting[0]), timeout=0.5):
                    waiting.pop(0)
                    if not waiting:
                        return
            except OSError:
                time.sleep(0.05)  # polling a port: there is no event to wait on
        tail = self._tail()
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {[self.port, *also]} within {timeout} s: {tail}")

    def _tail(self) -> str:
        err = self.proc.stderr.read().decode(errors="replace") if self.proc and self.proc.stderr and self.proc.poll() is not None else ""
        log = self.log.read_text(errors="replace") if self.log.exists() else ""
        return (err + log)[-2000:]

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()

    def kill(self) -> None:
        """kill -9: no chance to save anything."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "Mosquitto":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
