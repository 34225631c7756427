"""The real agent on 64-bit ARM: installed into the emulated Raspberry Pi OS-like root that
../shared/tools/pi-emulation/build-root.sh builds, run against a mosquitto on the host."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from sklearn.datasets import load_digits

from fleet import ROOT, TopicWatcher, spawn, stop
from protocol.tabular import write_csv
from protocol.topics import Topics

PI_ROOT = Path(os.environ.get("FEDMQ_PI_ROOT", "/tmp/pi-root"))
pytestmark = [
    pytest.mark.pi,
    pytest.mark.skipif(not (PI_ROOT / "opt" / "venv" / "bin" / "python").exists() or os.geteuid() != 0,
                       reason=f"no emulated aarch64 root at {PI_ROOT} (build it as root with "
                              "../shared/tools/pi-emulation/build-root.sh, or set FEDMQ_PI_ROOT)"),
]
QEMU = {**os.environ, "QEMU_CPU": "cortex-a72", "PYTHONPATH": ""}
QEMU.pop("PIP_FIND_LINKS", None)


def chroot(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["chroot", str(PI_ROOT), *args], env=QEMU, capture_output=True, text=True, **kw)


def test_agent_on_aarch64_is_aggregated(tmp_path, mosquitto):
    src = PI_ROOT / "opt" / "fedmq-src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "out", "bench", "tests", "__pycache__", "*.egg-info"))
    started = time.monotonic()
    install = chroot("/opt/venv/bin/pip", "install", "-q", "/opt/fedmq-src", timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    install_s = time.monotonic() - started
    assert chroot("/opt/venv/bin/python", "-c", "import platform; print(platform.machine())").stdout.strip() == "aarch64"

    X, y = load_digits(return_X_y=True)
    data = PI_ROOT / "tmp" / "pi-agent.csv"
    write_csv(data, X[:400], y[:400])
    topics = Topics("pi")
    watcher = TopicWatcher(mosquitto.port, topics.everything)
    coordinator = spawn("coordinator", "--broker", mosquitto.url, "--fleet", "pi", "--model", "sgd-classifier",
                        "--n-features", 64, "--classes", "0,1,2,3,4,5,6,7,8,9", "--publish-interval", "0.5",
                        log=tmp_path / "coordinator.log")
    with open(tmp_path / "pi-agent.log", "w") as log:
        agent = subprocess.Popen(["chroot", str(PI_ROOT), "/opt/venv/bin/fedmq-agent", "--broker", mosquitto.url,
                                  "--fleet", "pi", "--id", "pi-4", "--data", "/tmp/pi-agent.csv"],
                                 env=QEMU, stdout=log, stderr=subprocess.STDOUT)
    try:
        status = watcher.wait_for(
            lambda: (watcher.json(topics.coordinator_status) or {}).get("accepted", 0) >= 2
            and watcher.json(topics.coordinator_status),
            timeout=180, what="two updates from the aarch64 agent aggregated")
        assert status["rejected"] == {}
        agent_status = watcher.json(topics.agent_status("pi-4"))
        assert agent_status["updates_sent"] >= 2
    finally:
        assert stop(agent, timeout=30) == 0
        stop(coordinator)
        watcher.close()
    print(f"pi: install {install_s:.1f} s, aggregated after {time.monotonic() - started:.1f} s")
