"""Test tools for running real fedmq processes and watching their topics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tier.fleet import spawn  # noqa: F401  (one definition, for the tests and bench/scale_out.py)

ROOT = Path(__file__).resolve().parent.parent


# Longer than an agent's own grace on SIGTERM (--stop-timeout 10 s, then up to 5 s for its offline
# status), so a stop slowed by load ends in the process's own exit code, not in our SIGKILL.
STOP_TIMEOUT = 20.0


def stop(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM, wait bounded, SIGKILL if needed; returns the exit code."""
    return stop_all([proc], timeout)[0]


def stop_all(procs: Sequence[subprocess.Popen], timeout: float = STOP_TIMEOUT) -> list[int]:
    """`stop` for several processes at once: SIGTERM to all first, so they wind down together."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait(timeout))
    return codes


def write_shards(tmp_path: Path, ds, parts: Sequence, prefix: str = "a") -> list[Path]:
    """One CSV of `ds`'s training rows per index array of `parts` (`<prefix><i>.csv`, the agent
    reading it is `<prefix><i>`), and eval.csv of its test rows; the paths of the shards."""
    from protocol.tabular import write_csv

    paths = []
    for i, rows in enumerate(parts):
        paths.append(tmp_path / f"{prefix}{i}.csv")
        write_csv(paths[-1], ds.X_train[rows], ds.y_train[rows])
    write_csv(tmp_path / "eval.csv", ds.X_test, ds.y_test)
    return paths


@dataclass
class FleetRun:
    """The processes of `real_fleet`; once stopped, `code` is the coordinator's exit code and
    `agent_codes` the agents'."""

    coordinator: subprocess.Popen
    agents: list[subprocess.Popen] = field(default_factory=list)
    code: int | None = None
    agent_codes: list[int] = field(default_factory=list)


@contextmanager
def real_fleet(broker, tmp_path: Path, fleet: str, ds, shards: Sequence[Path], *flags,
               agent_flags: Sequence = ()) -> Iterator[FleetRun]:
    """A real coordinator (an sgd-classifier on `ds`'s classes and features, then `flags`) and one
    real agent per shard (its id the shard's name, `agent_flags`) on `broker`; all stopped on exit."""
    coordinator = spawn("coordinator", "--broker", broker.url, "--fleet", fleet, "--model", "sgd-classifier",
                        "--classes", ",".join(map(str, ds.classes)), "--n-features", ds.n_features, *flags,
                        log=tmp_path / "coordinator.log")
    run = FleetRun(coordinator)
    try:
        run.agents += [spawn("edge_agent", "--broker", broker.url, "--fleet", fleet, "--id", path.stem, "--data", path,
                             *agent_flags, log=tmp_path / f"{path.stem}.log") for path in shards]
        yield run
    finally:
        run.agent_codes = stop_all(run.agents)
        run.code = stop(coordinator)


class TopicWatcher:
    """Subscribes to a filter and keeps the newest payload of every topic; waits on conditions."""

    def __init__(self, url_port: int, topic_filter: str, host: str = "127.0.0.1",
                 auth: tuple[str, str] | None = None) -> None:
        self.latest: dict[str, bytes] = {}
        self.history: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.reconnected = threading.Event()  # set when it connected again after losing the broker
        self._connects = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{os.getpid()}-{id(self)}")
        if auth is not None:  # (username, password)
            self.client.username_pw_set(*auth)

        def on_connect(client, userdata, flags, reason_code, properties):
            self._connects += 1
            client.subscribe(topic_filter, qos=1)
            if self._connects > 1:
                self.reconnected.set()

        self.client.on_connect = on_connect
        self.client.reconnect_delay_set(0.1, 1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, url_port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "watcher could not subscribe"

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self.latest[msg.topic] = msg.payload
            self.history.append((msg.topic, msg.payload))
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str = "condition"):
        """Wait until predicate() is truthy (re-checked on every message); returns its value."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
                self._cond.wait(min(left, 0.5))

    def json(self, topic: str) -> dict | None:
        payload = self.latest.get(topic)
        return json.loads(payload) if payload else None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
