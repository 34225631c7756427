import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# tests/ for `from mosquitto import Mosquitto` and `from fleet import ...`; the root for the packages
for path in (ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from mosquitto import Mosquitto  # noqa: E402


def pytest_configure(config):
    # also declared in pyproject.toml; repeated here so the markers exist whatever the ini file
    config.addinivalue_line("markers", "slow: fault-injection tests with real processes (run in CI)")
    config.addinivalue_line("markers", "compose: the docker compose demo on a real Docker engine (scripts/docker-engine)")
    config.addinivalue_line("markers", "pi: needs the emulated aarch64 root of scripts/pi-root (as root: scripts/pi-root build)")


@pytest.fixture
def mosquitto(tmp_path):
    """A real mosquitto on a free loopback port, stopped after the test."""
    with Mosquitto(tmp_path / "broker") as broker:
        yield broker


@pytest.fixture
def nats_node(tmp_path):
    """One real nats-server (JetStream, MQTT listener, partition mapping with 4 partitions), stopped after."""
    from tier.cluster import NatsCluster

    with NatsCluster(tmp_path / "nats", nodes_count=1, partitions=4) as cluster:
        yield cluster


@pytest.fixture
def nats_cluster(tmp_path):
    """Three real nats-servers in one cluster (R3 streams), 4 partitions, stopped after."""
    from tier.cluster import NatsCluster

    with NatsCluster(tmp_path / "nats", nodes_count=3, partitions=4) as cluster:
        yield cluster
