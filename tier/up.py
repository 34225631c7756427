"""The whole scale-out tier from processes, in one command: scripts/tier-up.

Starts the NATS cluster (tier/cluster.py), N partition workers and the root with its standbys
(python -m tier.worker / tier.root, one log each in --dir), waits (bounded) until the root's
first model is retained, prints where devices connect and how to watch the model, and runs until
Ctrl-C or SIGTERM. Then it stops the roots and workers (SIGTERM, SIGKILL after a bound), then the
nodes. Every child is also told by the kernel to die with it (PR_SET_PDEATHSIG), so even a
kill -9 of this process leaves nothing running. A worker or root that dies while the tier is up is
started again (a standby has taken over meanwhile); one that dies before the tier is up is an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.cli import check_max_packet_bytes, int_or_off
from protocol.config import layered_parser, parse_layered
from protocol.model_spec import ESTIMATORS
from protocol.topics import Topics
from tier.cli_args import add_fleet_args, start_logging, stop_on_signals
from tier.cluster import TIER_USER, NatsCluster, add_device_auth_args, device_store, die_with_parent
from tier.mqtt_link import Link, parse_urls

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0
RESTART_DELAY_S = 1.0


@dataclass
class Child:
    """One worker or root process of the tier: its command, log and restarts."""

    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(self.argv, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         preexec_fn=die_with_parent)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-1200:] if self.log.exists() else ""


@dataclass
class Tier:
    """The cluster, workers and roots of one fleet, started and stopped together."""

    cluster: NatsCluster
    fleet: str
    root_args: list[str]
    workers: int = 2
    standbys: int = 1
    prefix: str = "fedmq"
    metrics_port: int | None = None  # the first root's --metrics-port; the other roots, then the workers, the next ones
    children: list[Child] = field(default_factory=list)

    def _argv(self, module: str, name: str, extra: list[str]) -> list[str]:
        c = self.cluster
        return [sys.executable, "-m", module, "--nats", ",".join(c.nats_urls), "--mqtt", ",".join(c.mqtt_urls),
                "--fleet", self.fleet, "--topic-prefix", self.prefix, "--partitions", str(c.partitions),
                "--replicas", str(c.replicas), "--id", name, *extra]

    def start(self, timeout: float, stop: threading.Event) -> int:
        """Start everything; returns the first retained model version (bounded by `timeout`; -1 if stopped)."""
        self.cluster.start(timeout)
        logs = self.cluster.workdir
        ports = self.metrics_ports()
        for i in range(self.workers):
            name = f"worker{i + 1}"
            self.children.append(Child(name, self._argv("tier.worker", name, _metrics(ports, name)), logs / f"{name}.log"))
        for i in range(1 + self.standbys):
            name = f"root{i + 1}"
            self.children.append(Child(name, self._argv("tier.root", name, self.root_args + _metrics(ports, name)),
                                       logs / f"{name}.log"))
        for child in self.children:
            child.start()
        return self._wait_model(timeout, stop)

    def metrics_ports(self) -> dict[str, int]:
        """Each process's --metrics-port: root1 on `metrics_port`, the standbys and then the workers on the next
        ports; none without it."""
        if self.metrics_port is None:
            return {}
        names = [f"root{i + 1}" for i in range(1 + self.standbys)] + [f"worker{i + 1}" for i in range(self.workers)]
        return {name: self.metrics_port + i for i, name in enumerate(names)}

    def _wait_model(self, timeout: float, stop: threading.Event) -> int:
        topics = Topics(self.fleet, self.prefix)
        got: list[int] = []
        seen = threading.Event()

        def on_message(client, userdata, msg) -> None:
            try:
                got.append(int(json.loads(msg.payload)["version"]))
                seen.set()
            except (ValueError, KeyError, TypeError):
                pass

        link = Link(parse_urls(self.cluster.mqtt_urls), f"fedmq-tier-up-{os.getpid()}", persistent=False,
                    on_message=on_message, on_connect=lambda c, *a: c.subscribe(topics.coordinator_status, 1))
        link.start()
        try:
            deadline = time.monotonic() + timeout
            while not seen.wait(0.5):
                if stop.is_set():
                    return -1
                dead = [c for c in self.children if not c.alive]
                if dead:
                    raise RuntimeError(f"{dead[0].name} exited (code {dead[0].proc.returncode}): {dead[0].tail()}")
                if time.monotonic() > deadline:
                    roots = [c for c in self.children if c.name.startswith("root")]
                    raise RuntimeError(f"no model retained within {timeout:g} s; {roots[0].name}: {roots[0].tail()}")
            return got[0]
        finally:
            link.close()

    def supervise(self, stop: threading.Event) -> None:
        """Until `stop`: start again any worker or root that exited."""
        while not stop.wait(0.5):
            for child in self.children:
                if not child.alive and not stop.is_set():
                    log.warning("%s exited (code %s); starting it again (log %s)", child.name,
                                child.proc.returncode, child.log)
                    stop.wait(RESTART_DELAY_S)
                    if not stop.is_set():
                        child.restarts += 1
                        child.start()
            if not all(n.alive for n in self.cluster.nodes):
                log.warning("a NATS node exited; see %s", self.cluster.workdir)
            self.cluster.keep_auth()

    def stop(self) -> None:
        """Roots and workers first (their final commits need the cluster), then the nodes; bounded."""
        live = [c for c in self.children if c.alive]
        for child in live:
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in live:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %g s: killed", child.name, STOP_TIMEOUT_S)
                child.proc.kill()
                child.proc.wait(STOP_TIMEOUT_S)
        self.cluster.stop()


def _metrics(ports: dict[str, int], name: str) -> list[str]:
    return ["--metrics-port", str(ports[name])] if name in ports else []


def banner(tier: Tier, version: int) -> str:
    """What a newcomer needs: where devices connect, how to watch the model, where the logs are."""
    c = tier.cluster
    topics = Topics(tier.fleet, tier.prefix)
    port = c.nodes[0].mqtt_port
    roots = 1 + tier.standbys
    password = c.write_password_file().resolve()
    if c.devices is not None:
        store = c.devices.resolve()
        devices = [f"devices (MQTT 3.1.1, any node; each with its own credentials from {store}): {' '.join(c.mqtt_urls)}",
                   f"  add one: python -m tier.devices add --store {store} --secrets SECRETS --fleet {tier.fleet} dev-1",
                   f"  fedmq-agent --broker {c.mqtt_urls[0]} --fleet {tier.fleet} --id dev-1 --username dev-1 "
                   "--password-file SECRETS/dev-1.password --data dev-1.csv"]
    else:
        devices = [f"devices (MQTT 3.1.1, any node; shared device user: any device may act as any other): "
                   f"{' '.join(c.mqtt_urls)}",
                   f"  fedmq-agent --broker {c.mqtt_urls[0]} --fleet {tier.fleet} --id dev-1 --data dev-1.csv"]
    return "\n".join([
        f"fedmq tier up: fleet {tier.fleet!r}, {len(c.nodes)} NATS node(s), {c.partitions} partitions, "
        f"{tier.workers} worker(s), {roots} root(s) (1 active, {roots - 1} standby); model version {version} retained",
        *devices,
        "watch the model (the root's status, one JSON line per published version"
        + (", its accuracy or r2 on --eval-csv" if "--eval-csv" in tier.root_args else "") + "; as the tier user):",
        f"  mosquitto_sub -h 127.0.0.1 -p {port} -V mqttv311 -u {TIER_USER} -P \"$(cat {password})\" "
        f"-t {topics.coordinator_status}",
        f"NATS (workers, root): {','.join(c.nats_urls)}",
        *(["Prometheus /metrics: " + ", ".join(f"{name} http://127.0.0.1:{port}/metrics"
                                                for name, port in tier.metrics_ports().items())]
          if tier.metrics_port is not None else []),
        f"logs and JetStream stores: {c.workdir.resolve()}",
        "Ctrl-C or SIGTERM stops everything.",
    ])


def build_parser() -> argparse.ArgumentParser:
    p = layered_parser("tier-up",
                    "Bring fedmq's scale-out tier up on loopback from processes: a NATS JetStream cluster with "
                    "MQTT listeners, partition workers and the root with standbys; prints the MQTT URLs devices "
                    "connect to and how to watch the model; Ctrl-C or SIGTERM stops everything.")
    p.add_argument("--dir", default=os.environ.get("FEDMQ_TIER_DIR", "tier-up"),
                   help="directory for the logs, configs and JetStream stores (env FEDMQ_TIER_DIR; default tier-up)")
    add_fleet_args(p, fleet_default="demo")
    p.add_argument("--nodes", type=int, default=3, choices=(1, 3), help="NATS nodes (3: R3 streams; default 3)")
    p.add_argument("--workers", type=int, default=2, help="partition worker processes (default 2)")
    p.add_argument("--standbys", type=int, default=1, help="standby roots beside the active one (default 1)")
    p.add_argument("--model", default="sgd-classifier", choices=sorted(ESTIMATORS),
                   help="the fleet's estimator (default sgd-classifier)")
    p.add_argument("--n-features", type=int, default=64, help="input features of the devices' data (default 64)")
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9",
                   help="comma-separated class labels for classifiers (default 0..9)")
    p.add_argument("--strategy", default="fedbuff", choices=("fedbuff", "fedasync"), help="root rule (default fedbuff)")
    p.add_argument("--buffer-size", type=int, default=5, help="fedbuff: updates per step (default 5)")
    p.add_argument("--buffer-timeout", type=float, default=5.0,
                   help="step a buffer that waited this many seconds (default 5)")
    p.add_argument("--live-window", type=float, metavar="SECONDS",
                   help="the roots' --live-window: K shrinks to the agents heard within it (default 3 x "
                        "--buffer-timeout; 0: K always)")
    p.add_argument("--target-updates-per-s", type=float, default=0.0, metavar="RATE",
                   help="pace steering: the root asks every device to report once per (agents online / RATE) "
                        "seconds (python -m tier.root --help: --pace-*; default 0, not steered)")
    p.add_argument("--max-packet-bytes", type=int_or_off, metavar="BYTES",
                   help="the roots' --max-packet-bytes: a model over it goes as retained chunks and a manifest "
                        "(default, or 0: no limit)")
    p.add_argument("--metrics-port", type=int_or_off, metavar="PORT",
                   help="Prometheus /metrics of every root and worker: root1 on PORT, the standbys and then the "
                        "workers on the next ports, in that order (default, or 0: none)")
    p.add_argument("--eval-csv", metavar="CSV",
                   help="the roots' --eval-csv: a held-out CSV (label column `label`) each published model is scored "
                        "on, accuracy or r2 in the root's status (default: none)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for the first retained model before giving up (default 120)")
    add_device_auth_args(p)
    return p


def root_args(args: argparse.Namespace) -> list[str]:
    """The root's own flags (beside the cluster's) from tier-up's."""
    extra = ["--model", args.model, "--n-features", str(args.n_features), "--strategy", args.strategy,
             "--buffer-size", str(args.buffer_size), "--buffer-timeout", str(args.buffer_timeout),
             "--audit-log", str(Path(args.dir).resolve() / "audit.jsonl")]
    if args.model != "sgd-regressor" and args.classes:
        extra += ["--classes", args.classes]
    if args.live_window is not None:
        extra += ["--live-window", str(args.live_window)]
    if args.target_updates_per_s:
        extra += ["--target-updates-per-s", str(args.target_updates_per_s)]
    if args.max_packet_bytes:
        extra += ["--max-packet-bytes", str(args.max_packet_bytes)]
    if args.eval_csv:
        extra += ["--eval-csv", str(Path(args.eval_csv).resolve())]
    return extra


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_layered(parser, argv)
    devices = device_store(parser, args)
    start_logging(args.log_level)
    if args.workers < 1 or args.standbys < 0:
        print("tier-up: --workers must be at least 1 and --standbys at least 0", file=sys.stderr)
        return 2
    stop = stop_on_signals((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    try:
        check_max_packet_bytes(args.max_packet_bytes)
        if args.eval_csv and not Path(args.eval_csv).is_file():  # now, not once the cluster is up
            raise ValueError(f"{args.eval_csv}: no such file")
        last = (args.metrics_port or 0) + args.workers + args.standbys
        if args.metrics_port is not None and not (0 < args.metrics_port and last < 65536):
            raise ValueError(f"--metrics-port {args.metrics_port}: its {args.workers + args.standbys + 1} ports "
                             "must be in 1..65535")
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        cluster = NatsCluster(Path(args.dir), args.nodes, args.partitions, args.topic_prefix, die_with_parent=True,
                              devices=devices)
        tier = Tier(cluster, args.fleet, root_args(args), args.workers, args.standbys, args.topic_prefix,
                    metrics_port=args.metrics_port)
    except (ValueError, OSError) as exc:
        print(f"tier-up: {exc}", file=sys.stderr)
        return 2
    try:
        version = tier.start(args.timeout, stop)
        if not stop.is_set():
            print(banner(tier, version), flush=True)
            tier.supervise(stop)
        return 0
    except (RuntimeError, OSError) as exc:
        print(f"tier-up: {' '.join(str(exc).split())[-600:]}", file=sys.stderr)
        return 1
    finally:
        tier.stop()


if __name__ == "__main__":
    sys.exit(main())
