"""The command-line flags every process of the scale-out tier shares, defined once.

The root, the partition workers and scripts/tier-up name the same fleet, topic prefix and
partition count, and the root and workers reach the same cluster: one definition each, so a
default or a help text cannot drift between them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time

from coordinator.cli import add_metrics_argument, check_metrics_port, start_metrics
from protocol.stopping import stop_event_on_signals
from tier.cluster import DEFAULT_PARTITIONS
from tier.nats_io import Nats

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
CLUSTER_REQUIRED = ("nats", "mqtt", "fleet")  # add_cluster_args' flags some layer must set


def add_fleet_args(parser: argparse.ArgumentParser, *, fleet_default: str | None = None) -> None:
    """--fleet (required unless `fleet_default`), --topic-prefix, --partitions, --log-level."""
    if fleet_default is None:
        parser.add_argument("--fleet", help="fleet name (required)")
    else:
        parser.add_argument("--fleet", default=fleet_default, help=f"fleet name (default: {fleet_default})")
    parser.add_argument("--topic-prefix", default="fedmq", help="first topic level (default: fedmq)")
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS,
                        help=f"N of the cluster's partition(N, agent) mapping, fixed for the life of the fleet "
                             f"(default {DEFAULT_PARTITIONS})")
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS,
                        help="logging level of this process, on stderr (default INFO)")


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    """The fleet's flags and the cluster a root or worker connects to: --nats, --mqtt, --id, --replicas."""
    parser.add_argument("--nats", help="comma-separated nats:// URLs of the cluster's nodes (required)")
    parser.add_argument("--mqtt", help="comma-separated mqtt:// URLs of the nodes' MQTT listeners (required)")
    add_fleet_args(parser)
    parser.add_argument("--id", default=f"{socket.gethostname()}-{os.getpid()}",
                        help="this process's id, unique in the fleet (default: host-pid)")
    parser.add_argument("--replicas", type=int, default=3, choices=(1, 3), help="JetStream replicas of the tier's state")
    add_metrics_argument(parser)


def start_tier_metrics(port: int | None, source) -> None:
    """--metrics-port of a root or worker: the coordinator's exporter over `source()` (tier/metrics.py), read at
    every scrape; ValueError (one line) when it cannot serve."""
    if port is None:
        return
    check_metrics_port(port)

    def collector():
        from tier.metrics import TierCollector  # prometheus-client: imported only when asked for

        return TierCollector(source)

    start_metrics(port, collector)


def start_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def stop_on_signals(signals: tuple = (signal.SIGTERM, signal.SIGINT)) -> threading.Event:
    """An event `signals` set: the process finishes its commits and stops. Set by a relay thread, not in
    the signal handler (protocol/stopping.py: a handler setting an event the main thread waits on can
    deadlock); the relay lives as long as the process."""
    stop, _relay = stop_event_on_signals(signals)
    return stop


def connect_nats(args: argparse.Namespace, role: str) -> Nats:
    """The NATS connection of a root or worker (`role`) parsed with add_cluster_args."""
    return Nats(args.nats.split(","), args.fleet, prefix=args.topic_prefix, replicas=args.replicas,
                name=f"fedmq-{role}-{args.id}")


START_PATIENCE_S = 30.0  # how long a root or worker keeps trying to start while NATS times out


def start_with_retries(build, stop: threading.Event, role: str):
    """build() until it stops timing out, for at most START_PATIENCE_S: a standby started while a NATS
    node restarts (an election under way) must come up, not exit ("root3 never came up: nats: timeout")."""
    deadline = time.monotonic() + START_PATIENCE_S
    while True:
        try:
            return build()
        except TimeoutError as exc:
            if time.monotonic() > deadline or stop.is_set():
                raise
            logging.getLogger(__name__).warning("tier %s: %s while starting; retrying", role, exc or "timeout")
            stop.wait(1.0)
