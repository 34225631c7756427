"""`python -m coordinator` as a real process against a real mosquitto: model, updates, garbage,
status, SIGTERM, restart, the retained model as a floor for versions, and CLI errors."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from coordinator.store import load_checkpoint
from fleet import ROOT, TopicWatcher, spawn, stop
from protocol import codec
from protocol.messages import UpdateMessage, decode_model, encode_update
from protocol.topics import Topics
from simulation.mosquitto import free_port

FLEET = "sess"
T = Topics(FLEET)
N_FEATURES = 4
N_PARAMS = 3 * N_FEATURES + 3  # three classes: one row per class plus intercepts
WAIT = 20  # seconds: generous bound on every wait


def start(tmp_path, broker, *extra, name="coordinator"):
    return spawn("coordinator", "--broker", broker.url, "--fleet", FLEET, "--model", "sgd-classifier",
                 "--n-features", N_FEATURES, "--classes", "0,1,2", "--publish-interval", "0.2",
                 "--no-feature-stats",  # hand-made updates, no agent sends statistics: without this the first model waits for them
                 *extra, log=tmp_path / f"{name}.log")


def status(watcher) -> dict:
    return watcher.json(T.coordinator_status) or {}


def model(watcher):
    payload = watcher.latest.get(T.model)
    return decode_model(payload, fleet=FLEET) if payload else None


def publish_update(watcher, agent: str, seq: int, base: int, value: float = 0.1) -> None:
    enc = codec.encode(np.full(N_PARAMS, value), "int8", np.random.default_rng(seq))
    payload = encode_update(UpdateMessage(agent, seq, base, 20, enc, {"eval_accuracy": 0.5}))
    watcher.client.publish(T.update(agent), payload, qos=1).wait_for_publish(WAIT)


def test_updates_garbage_status_sigterm_and_restart(tmp_path, mosquitto):
    ckpt = tmp_path / "ckpt"
    metrics_port = free_port()
    watcher = TopicWatcher(mosquitto.port, T.everything)
    coord = start(tmp_path, mosquitto, "--checkpoint-dir", ckpt, "--metrics-port", metrics_port)
    try:
        first = watcher.wait_for(lambda: model(watcher), WAIT, "the initial retained model")
        assert first.version == 0 and first.spec.n_params == N_PARAMS
        for i, agent in enumerate(("a", "b", "c")):
            publish_update(watcher, agent, seq=1, base=0, value=0.1 * (i + 1))
        watcher.client.publish(T.update("a"), b"\xc1 definitely not msgpack", qos=1).wait_for_publish(WAIT)
        watcher.wait_for(
            lambda: status(watcher).get("accepted", 0) >= 3 and status(watcher)["rejected"].get("decode", 0) >= 1
            and (model(watcher).version >= 3), WAIT, "3 accepted, 1 decode rejection, version 3 published")
        seen = status(watcher)
        assert seen["agents"] == 3 and seen["strategy"] == "fedasync"
        assert seen["fleet_eval"] == {"accuracy": pytest.approx(0.5)}
        assert seen["version"] == model(watcher).version
        assert not np.allclose(model(watcher).params, 0)
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=WAIT).read().decode()
        assert 'fedmq_updates_rejected_total{fleet="sess",reason="decode"} 1.0' in body
        assert "fedmq_model_version" in body
        assert stop(coord) == 0  # SIGTERM: final checkpoint and status, clean exit
    finally:
        stop(coord)
    before = model(watcher).version
    assert load_checkpoint(ckpt)["version"] == before
    assert {p.name for p in ckpt.iterdir()} <= {"checkpoint.msgpack", "checkpoint.previous.msgpack"}  # no temp files

    watcher.latest.pop(T.model)
    restarted = start(tmp_path, mosquitto, "--checkpoint-dir", ckpt, name="coordinator2")
    try:
        resumed = watcher.wait_for(lambda: model(watcher), WAIT, "the resumed model")
        assert resumed.version >= before
        publish_update(watcher, "a", seq=1, base=resumed.version)  # replay: the checkpoint remembers seq 1
        publish_update(watcher, "a", seq=2, base=resumed.version)
        watcher.wait_for(lambda: status(watcher).get("rejected", {}).get("replay") == 1
                         and status(watcher)["accepted"] == 4, WAIT, "the replay refused, the new update taken")
    finally:
        assert stop(restarted) == 0
        watcher.close()
    log = (tmp_path / "coordinator.log").read_text() + (tmp_path / "coordinator2.log").read_text()
    assert "Traceback" not in log
    assert "rejected 1 update(s) as decode" in log


def test_without_checkpoint_the_retained_model_is_the_floor(tmp_path, mosquitto):
    watcher = TopicWatcher(mosquitto.port, T.everything)
    coord = start(tmp_path, mosquitto)
    try:
        watcher.wait_for(lambda: model(watcher), WAIT, "the initial model")
        for seq in range(1, 4):
            base = model(watcher).version
            publish_update(watcher, "a", seq=seq, base=base)
            watcher.wait_for(lambda: model(watcher).version > base, WAIT, f"version > {base}")
    finally:
        assert stop(coord) == 0
    before = model(watcher)
    watcher.latest.pop(T.model)
    restarted = start(tmp_path, mosquitto, name="coordinator2")
    try:
        # agents ignore versions they have seen, so starting over at 0 would strand them
        after = watcher.wait_for(lambda: model(watcher), WAIT, "the restarted coordinator's model")
        assert after.version == before.version
        np.testing.assert_array_equal(after.params, before.params)
        publish_update(watcher, "b", seq=1, base=after.version)  # an agent trained on it is welcome
        watcher.wait_for(lambda: model(watcher).version == before.version + 1, WAIT, "the next version")
        assert "future_base" not in status(watcher)["rejected"]
    finally:
        assert stop(restarted) == 0
        watcher.close()


def test_model_republished_after_broker_restart_without_persistence(tmp_path, mosquitto):
    coord = start(tmp_path, mosquitto, "--keepalive", "5")
    try:
        watcher = TopicWatcher(mosquitto.port, T.model)
        watcher.wait_for(lambda: model(watcher), WAIT, "the initial model")
        watcher.close()
        mosquitto.restart()  # no persistence: the retained model is gone
        watcher = TopicWatcher(mosquitto.port, T.model)
        try:
            assert watcher.wait_for(lambda: model(watcher), 30, "the model republished on reconnect").version == 0
        finally:
            watcher.close()
    finally:
        assert stop(coord) == 0


def _run(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "coordinator", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


BASE = ["--fleet", FLEET, "--model", "sgd-classifier", "--n-features", N_FEATURES, "--classes", "0,1,2"]


def test_unreachable_broker_exits_1_with_one_line():
    proc = _run("--broker", f"mqtt://127.0.0.1:{free_port()}", *BASE)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [line for line in errors if line.startswith("fedmq-coordinator: error: cannot reach broker")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--hyperparameters", "loss=bogus"], "'loss' parameter"),
        (["--hyperparameters", "alpha"], "is not k=v"),
        (["--aggregate", "mode"], "unknown aggregate"),
        (["--norm-factor", "-1"], "--norm-factor must be > 0"),
        (["--publish-interval", "0"], "--publish-interval must be > 0"),
        (["--buffer-size", "0"], "--buffer-size must be >= 1"),
        (["--strategy", "fedbuff", "--alpha", "2"], "--alpha in (0, 1]"),
    ],
)
def test_bad_configuration_exits_2(extra, message):
    proc = _run("--broker", "mqtt://127.0.0.1:1", *BASE, *extra)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "error:" in line]) == 1


def test_checkpoint_of_another_fleet_or_corrupt_exits_2(tmp_path, mosquitto):
    ckpt = tmp_path / "ckpt"
    coord = start(tmp_path, mosquitto, "--checkpoint-dir", ckpt)
    watcher = TopicWatcher(mosquitto.port, T.model)
    try:
        watcher.wait_for(lambda: model(watcher), WAIT, "the first model")
    finally:
        assert stop(coord) == 0
        watcher.close()
    other = _run("--broker", mosquitto.url, *BASE[:2], "--model", "sgd-regressor", "--n-features", N_FEATURES,
                 "--checkpoint-dir", ckpt)
    assert other.returncode == 2 and "checkpoint is for fleet" in other.stderr, other.stderr
    for name in ("checkpoint.msgpack", "checkpoint.previous.msgpack"):  # with one good, it falls back (test_checkpoints)
        (ckpt / name).write_bytes(b"\x85 truncated")
    corrupt = _run("--broker", mosquitto.url, *BASE, "--checkpoint-dir", ckpt)
    assert corrupt.returncode == 2 and "is corrupt" in corrupt.stderr and "Traceback" not in corrupt.stderr
