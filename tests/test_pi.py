"""The real agent on 64-bit ARM: installed with `scripts/pi-root install` into the emulated
Raspberry Pi OS-like root that `scripts/pi-root build` makes, run with `scripts/pi-root run`
against a mosquitto on the host (docs/raspberry-pi.md)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from sklearn.datasets import load_digits

from fleet import ROOT, TopicWatcher, spawn, stop
from protocol.tabular import write_csv
from protocol.topics import Topics

PI_ROOT = Path(os.environ.get("FEDMQ_PI_ROOT") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
               / "fedmq" / "pi-root")  # scripts/pi-root's default
PI_SCRIPT = str(ROOT / "scripts" / "pi-root")
pytestmark = [
    pytest.mark.pi,
    pytest.mark.skipif(not (PI_ROOT / "opt" / "venv" / "bin" / "python").exists() or os.geteuid() != 0,
                       reason=f"no emulated aarch64 root at {PI_ROOT} (as root: scripts/pi-root build; "
                              "FEDMQ_PI_ROOT chooses the path)"),
]
ENV = {**os.environ, "FEDMQ_PI_ROOT": str(PI_ROOT)}


def pi_root(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PI_SCRIPT, *args], env=ENV, capture_output=True, text=True, **kw)


def test_agent_on_aarch64_is_aggregated(tmp_path, mosquitto):
    started = time.monotonic()
    install = pi_root("install", timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    install_s = time.monotonic() - started
    assert pi_root("run", "python", "-c", "import platform; print(platform.machine())").stdout.strip() == "aarch64"

    X, y = load_digits(return_X_y=True)
    data = PI_ROOT / "tmp" / "pi-agent.csv"
    write_csv(data, X[:400], y[:400])
    topics = Topics("pi")
    watcher = TopicWatcher(mosquitto.port, topics.everything)
    coordinator = spawn("coordinator", "--broker", mosquitto.url, "--fleet", "pi", "--model", "sgd-classifier",
                        "--n-features", 64, "--classes", "0,1,2,3,4,5,6,7,8,9", "--publish-interval", "0.5",
                        log=tmp_path / "coordinator.log")
    with open(tmp_path / "pi-agent.log", "w") as log:
        agent = subprocess.Popen([PI_SCRIPT, "run", "fedmq-agent", "--broker", mosquitto.url,
                                  "--fleet", "pi", "--id", "pi-4", "--data", "/tmp/pi-agent.csv"],
                                 env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        status = watcher.wait_for(
            lambda: (watcher.json(topics.coordinator_status) or {}).get("accepted", 0) >= 2
            and watcher.json(topics.coordinator_status),
            timeout=180, what="two updates from the aarch64 agent aggregated")
        assert status["rejected"] == {}
        agent_status = watcher.json(topics.agent_status("pi-4"))
        assert agent_status["updates_sent"] >= 1  # published on changes (the first update), not per round
    finally:
        assert stop(agent, timeout=30) == 0
        stop(coordinator)
        watcher.close()
    print(f"pi: install {install_s:.1f} s, aggregated after {time.monotonic() - started:.1f} s")
