"""The broker's Docker healthcheck has its own account (issue 22 point 2).

Sessions are named after the username (`use_username_as_clientid`), so the healthcheck logging
in as `monitor` every 10 s replaced a live monitor's session. Here docker-compose.yml's own
healthcheck command runs, with real mosquitto_sub, against broker/'s config and ACL while a
monitor is connected: the monitor must never lose its connection, and the health account
reads the uptime and nothing else.
"""

from __future__ import annotations

import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from fleet import ROOT
from test_broker_acl import make_credentials, start_production_broker


def healthcheck_command(creds, port: int) -> str:
    """docker-compose.yml's broker healthcheck, its secret and port rewritten for this machine."""
    test = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["broker"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    command = test[1].replace("$$", "$").replace("-p 1883", f"-p {port}")
    return command.replace("/run/secrets/", f"{creds}/secrets/")


@pytest.fixture
def broker(tmp_path):
    creds = make_credentials(tmp_path / "creds", "a1", fleet="f")
    broker = start_production_broker(tmp_path / "broker", creds)
    broker.creds = creds
    yield broker
    broker.stop()


def test_the_healthcheck_never_kicks_a_live_monitor(broker):
    disconnects, connected = [], threading.Event()
    monitor = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="monitor")
    monitor.username_pw_set("monitor", (broker.creds / "secrets" / "monitor.password").read_text().strip())
    monitor.on_connect = lambda *a: connected.set()
    monitor.on_disconnect = lambda c, u, flags, rc, props: disconnects.append(str(rc))
    monitor.connect(broker.host, broker.plain_port)
    monitor.loop_start()
    try:
        assert connected.wait(10), "the monitor could not connect"
        command = healthcheck_command(broker.creds, broker.plain_port)
        for _ in range(3):  # three healthcheck intervals
            run = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30)
            assert run.returncode == 0, f"the healthcheck failed: {run.stderr}"
        time.sleep(0.5)  # a takeover disconnect arrives right after the healthcheck's CONNECT: give it time to land
        assert not disconnects, f"the healthcheck replaced the monitor's session: {disconnects}"
    finally:
        monitor.loop_stop()
        monitor.disconnect()


def test_the_health_account_reads_the_uptime_and_nothing_else(broker):
    secret = (broker.creds / "secrets" / "health.password").read_text().strip()
    base = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.plain_port), "-u", "health", "-P", secret, "-C", "1",
            "-W", "3"]
    assert subprocess.run([*base, "-t", "$SYS/broker/uptime"], capture_output=True, timeout=30).returncode == 0
    # a retained message the monitor could read is never sent to health
    coordinator = (broker.creds / "secrets" / "coordinator.password").read_text().strip()
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.plain_port), "-u", "coordinator", "-P",
                    coordinator, "-t", "fedmq/f/coordinator/status", "-m", "{}", "-r", "-q", "1"], check=True, timeout=30)
    read = subprocess.run([*base, "-t", "fedmq/#"], capture_output=True, text=True, timeout=30)
    assert read.stdout == "" and read.returncode != 0, read  # -W: timed out with nothing
