"""edge_agent.session against a real mosquitto: the agent process, and updates held while offline."""

import json
import threading
import time

import pytest

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sklearn.datasets import load_digits

from edge_agent.agent import Agent
from edge_agent.data import ArraySource
from edge_agent.session import PAUSE_COST_BYTES, PER_MESSAGE_BYTES, AgentSession, skip_models_in_round
from edge_agent.trainer import LocalTrainer
from fleet import TopicWatcher, spawn, stop
from protocol.messages import ModelMessage, decode_update, encode_model
from protocol.model_spec import ModelSpec
from protocol.tabular import write_csv
from protocol.topics import Topics
from protocol.transport import BrokerSettings
from simulation.mosquitto import Mosquitto

X, Y = load_digits(return_X_y=True)
TOPICS = Topics("t")
SPEC = ModelSpec("sgd-classifier", 64, tuple(range(10)))


def model_bytes(version: int) -> bytes:
    return encode_model(ModelMessage("t", version, SPEC, np.zeros(SPEC.n_params)))


def statuses(watcher: TopicWatcher, agent_id: str) -> list[dict]:
    topic = TOPICS.agent_status(agent_id)
    return [json.loads(p) for t, p in watcher.history if t == topic and p]


def test_agent_process_sends_an_update_and_goes_offline_on_sigterm(tmp_path, mosquitto):
    write_csv(tmp_path / "d.csv", X[:100], Y[:100])
    watcher = TopicWatcher(mosquitto.port, TOPICS.everything)
    watcher.client.publish(TOPICS.model, model_bytes(5), qos=1, retain=True).wait_for_publish(5)
    log = tmp_path / "agent.log"
    proc = spawn("edge_agent", "--broker", mosquitto.url, "--fleet", "t", "--id", "pi-1", "--data", tmp_path / "d.csv",
                 "--codec", "int4", "--seed", "1", log=log)
    try:
        payload = watcher.wait_for(lambda: watcher.latest.get(TOPICS.update("pi-1")), timeout=30, what="an update")
        update = decode_update(payload)  # it came on pi-1's own topic
        assert (update.base_version, update.n_samples) == (5, 100)
        assert update.delta.quant == "int4" and set(update.metrics) == {"eval_loss", "eval_accuracy"}
        watcher.wait_for(lambda: any(s.get("updates_sent") == 1 for s in statuses(watcher, "pi-1")),
                         timeout=10, what="the status after the update")
        states = [s["state"] for s in statuses(watcher, "pi-1")]
        assert states == ["online", "idle"]  # a short round says nothing of itself: its update does
        online = statuses(watcher, "pi-1")[0]
        assert online["agent"] == "pi-1" and online["codec"] == "int4" and online["samples"] == 100
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()
    watcher.wait_for(lambda: watcher.json(TOPICS.agent_status("pi-1"))["state"] == "offline", timeout=10,
                     what="the offline status")
    final = watcher.json(TOPICS.agent_status("pi-1"))
    assert final["updates_sent"] == 1 and final["version"] == 5  # a clean goodbye, not the bare last will
    watcher.close()
    text = log.read_text()
    assert f"sent update: version 5, seq {update.seq}, {len(payload)} bytes, eval_accuracy" in text
    assert "Traceback" not in text


def test_statistics_and_schema_go_out_once_per_connection(tmp_path):
    """An agent process sends its feature statistics and schema once at start and once again after a reconnection
    (the broker may have lost them), not twice per connection. Seen red: two of each within ~20 ms at start
    (connect() returned before the session's on_connect ran, which then asked for a resend of what the main thread
    had just sent)."""
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    write_csv(tmp_path / "d.csv", X[:100], Y[:100])
    watcher = proc = None
    try:
        watcher = TopicWatcher(broker.port, TOPICS.everything)
        watcher.client.reconnect_delay_set(0.1, 0.5)
        watcher.client.publish(TOPICS.model, model_bytes(5), qos=1, retain=True).wait_for_publish(5)
        proc = spawn("edge_agent", "--broker", broker.url, "--fleet", "t", "--id", "pi-1", "--data", tmp_path / "d.csv",
                     "--seed", "1", log=tmp_path / "agent.log")

        def sent(topic: str) -> int:
            return sum(1 for t, p in watcher.history if t == topic and p)

        updates = lambda: sent(TOPICS.update("pi-1"))  # noqa: E731
        watcher.wait_for(updates, 30, "an update")  # statistics and schema come before the first round
        assert (sent(TOPICS.stats("pi-1")), sent(TOPICS.schema("pi-1"))) == (1, 1), watcher.history
        broker.stop()  # not persistent: the restarted broker has lost every retained message
        broker.start()
        watcher.wait_for(watcher.reconnected.is_set, 30, "the watcher back")
        watcher.client.publish(TOPICS.model, model_bytes(6), qos=1, retain=True).wait_for_publish(5)
        watcher.wait_for(lambda: updates() >= 2 and sent(TOPICS.stats("pi-1")) >= 2 and sent(TOPICS.schema("pi-1")) >= 2,
                         30, "the agent back, its statistics and schema sent again and an update on the new model")
        assert (sent(TOPICS.stats("pi-1")), sent(TOPICS.schema("pi-1"))) == (2, 2), watcher.history
    finally:
        if proc is not None:
            stop(proc)
        if watcher is not None:
            watcher.close()
        broker.stop()


def test_no_model_on_a_fleet_nobody_serves_is_a_warning_at_a_back_off(tmp_path, mosquitto):
    """`--fleet other` where no coordinator serves it: a WARNING after --no-model-warning naming the topic and the
    likely causes, then again after twice as long (1, 3, 7 s here), not silence until --unheard-after (120 s) nor a
    line per poll. Seen red: no such line within the bound (the agent said nothing after its statistics)."""
    write_csv(tmp_path / "d.csv", X[:100], Y[:100])
    log = tmp_path / "agent.log"
    proc = spawn("edge_agent", "--broker", mosquitto.url, "--fleet", "other", "--id", "pi-1", "--data",
                 tmp_path / "d.csv", "--no-model-warning", "1", "--poll-interval", "0.2", log=log)
    try:
        deadline = time.monotonic() + 60
        warnings: list[str] = []
        while len(warnings) < 3:  # polling a log file: there is no event to wait on
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            warnings = [line for line in log.read_text().splitlines() if "still waiting for a model" in line]
            time.sleep(0.2)
    finally:
        assert stop(proc) == 0
    assert len(warnings) == 3, warnings  # at 1, 3 and 7 s: a warning per poll would be dozens
    assert all("WARNING" in w and "fedmq/other/model" in w and "--fleet 'other'" in w and "coordinator running" in w
               and "ACL" in w for w in warnings), warnings
    assert [w.rsplit("next warning in ", 1)[1] for w in warnings] == ["2 s)", "4 s)", "8 s)"], warnings


def test_status_says_changes_not_rounds_and_metrics_travel_in_the_update(tmp_path, mosquitto):
    """Four rounds, two statuses (online, then idle after the first update) until the goodbye."""
    write_csv(tmp_path / "d.csv", X[:100], Y[:100])
    watcher = TopicWatcher(mosquitto.port, TOPICS.everything)
    log = tmp_path / "agent.log"
    proc = spawn("edge_agent", "--broker", mosquitto.url, "--fleet", "t", "--id", "pi-5", "--data", tmp_path / "d.csv",
                 "--seed", "1", "--train-metrics", log=log)
    topic = TOPICS.update("pi-5")
    try:
        watcher.wait_for(lambda: statuses(watcher, "pi-5"), timeout=30, what="the agent to come online")
        for version in range(1, 5):
            watcher.client.publish(TOPICS.model, model_bytes(version), qos=1, retain=True).wait_for_publish(5)
            watcher.wait_for(lambda: any(t == topic and decode_update(p).base_version == version
                                         for t, p in watcher.history), 30, f"the update on version {version}")
        update = decode_update(watcher.latest[topic])
        assert set(update.metrics) == {"eval_loss", "eval_accuracy", "train_loss", "train_accuracy"}
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()
    watcher.wait_for(lambda: watcher.json(TOPICS.agent_status("pi-5"))["state"] == "offline", 10, "the goodbye")
    docs = statuses(watcher, "pi-5")
    watcher.close()
    assert [d["state"] for d in docs] == ["online", "idle", "offline"]
    idle = docs[1]
    assert idle["updates_sent"] == 1 and "metrics" not in idle and idle["since"] <= idle["time"]
    assert docs[2]["updates_sent"] == 4 and docs[2]["since"] >= idle["time"]  # the goodbye is a change


def test_min_model_interval_skips_the_versions_between(tmp_path, mosquitto):
    """With --min-model-interval the agent takes version 1, misses 2..9 and reads 10, the newest, when due."""
    write_csv(tmp_path / "d.csv", X[:60], Y[:60])
    watcher = TopicWatcher(mosquitto.port, TOPICS.everything)
    log = tmp_path / "agent.log"
    proc = spawn("edge_agent", "--broker", mosquitto.url, "--fleet", "t", "--id", "pi-6", "--data", tmp_path / "d.csv",
                 "--min-model-interval", "3", "--resend-after", "0", "--log-level", "DEBUG", log=log)
    topic = TOPICS.update("pi-6")
    bases = lambda: [decode_update(p).base_version for t, p in watcher.history if t == topic]  # noqa: E731
    try:
        watcher.wait_for(lambda: statuses(watcher, "pi-6"), timeout=30, what="the agent to come online")
        watcher.client.publish(TOPICS.model, model_bytes(1), qos=1, retain=True).wait_for_publish(5)
        watcher.wait_for(lambda: bases() == [1], 30, "the update on version 1")
        for version in range(2, 11):  # all within the 3 s the agent does not listen
            watcher.client.publish(TOPICS.model, model_bytes(version), qos=1, retain=True).wait_for_publish(5)
        watcher.wait_for(lambda: len(bases()) >= 2, 30, "the second update")
        assert bases() == [1, 10]
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()
    watcher.close()
    text = log.read_text()
    assert "global model version 10 received" in text
    assert not any(f"global model version {v} received" in text for v in range(2, 10)), text


@pytest.mark.parametrize("skip", [True, False], ids=["skip-models-in-rounds", "no-skip"])
def test_a_long_round_does_not_download_the_versions_published_during_it(tmp_path, mosquitto, skip):
    """A round padded to 2 s (bench/padding.py, as a slow device) with models coming every 0.2 s: once the agent
    has seen a round and the gap between models, it trains unsubscribed and reads only the newest after the
    round (the default); --no-skip-models-in-rounds receives every version."""
    write_csv(tmp_path / "d.csv", X[:60], Y[:60])
    watcher = TopicWatcher(mosquitto.port, TOPICS.everything)
    log = tmp_path / "agent.log"
    proc = spawn("bench.padding", "2.0", "--broker", mosquitto.url, "--fleet", "t", "--id", "pi-9", "--data",
                 tmp_path / "d.csv", "--resend-after", "0", "--log-level", "DEBUG",
                 *([] if skip else ["--no-skip-models-in-rounds"]), log=log)
    topic = TOPICS.update("pi-9")
    bases = lambda: [decode_update(p).base_version for t, p in watcher.history if t == topic]  # noqa: E731
    rounds = lambda n: lambda: log.read_text().count("round start") >= n  # noqa: E731

    def publish(versions) -> None:
        for version in versions:  # the publisher's pace (a fast fleet), not a synchronisation
            watcher.client.publish(TOPICS.model, model_bytes(version), qos=1, retain=True).wait_for_publish(5)
            time.sleep(0.2)

    try:
        watcher.wait_for(lambda: statuses(watcher, "pi-9"), timeout=30, what="the agent to come online")
        publish([1])
        watcher.wait_for(rounds(1), 30, "the first round")
        publish(range(2, 5))  # during round 1: listening (nothing known yet), the gap is learned
        watcher.wait_for(rounds(2), 30, "the second round, on version 4")
        publish(range(5, 11))  # during round 2
        watcher.wait_for(lambda: len(bases()) >= 3, 30, "the third update")
        assert bases()[:3] == [1, 4, 10]
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()
    watcher.close()
    text = log.read_text()
    received = [v for v in range(5, 10) if f"global model version {v} received" in text]
    assert received == ([] if skip else list(range(5, 10))), text[-3000:]
    assert "global model version 10 received" in text


def test_a_round_runs_unsubscribed_once_the_models_it_would_waste_outweigh_the_pause():
    """The break-even of skip_models_in_round: (rounds / gap - 1) x (model + headers) against the pause, also for
    a round of 1.5 publishes (a float32 model of 3.5 KB: ~1.8 KB wasted listening), which the rule of two
    publishes left listening; never for a round shorter than the gap, however large the model."""
    assert skip_models_in_round(0.3, 0.2, 3500)
    assert not skip_models_in_round(0.3, 0.2, 400)  # 0.5 x 530 B: less than the pause
    assert skip_models_in_round(0.6, 0.2, 400)  # 2 x 530 B
    assert not skip_models_in_round(0.19, 0.2, 10 ** 6)
    at = 1 + PAUSE_COST_BYTES / (3500 + PER_MESSAGE_BYTES)  # ~1.14 publishes a round
    assert skip_models_in_round(0.2 * at * 1.01, 0.2, 3500) and not skip_models_in_round(0.2 * at * 0.99, 0.2, 3500)


def test_agent_process_ignores_garbage_on_the_model_topic(tmp_path, mosquitto):
    write_csv(tmp_path / "d.csv", X[:50], Y[:50])
    watcher = TopicWatcher(mosquitto.port, TOPICS.everything)
    watcher.client.publish(TOPICS.model, b"\xc1 not msgpack", qos=1, retain=True).wait_for_publish(5)
    log = tmp_path / "agent.log"
    proc = spawn("edge_agent", "--broker", mosquitto.url, "--fleet", "t", "--id", "pi-2", "--data", tmp_path / "d.csv",
                 log=log)
    try:
        watcher.wait_for(lambda: statuses(watcher, "pi-2"), timeout=30, what="the agent to come online")
        watcher.client.publish(TOPICS.model, model_bytes(2), qos=1, retain=True).wait_for_publish(5)
        update = decode_update(watcher.wait_for(lambda: watcher.latest.get(TOPICS.update("pi-2")), 30, "an update"))
        assert update.base_version == 2
    finally:
        assert stop(proc) == 0
        watcher.close()
    assert "ignoring an unusable model message" in log.read_text()


class Recorder:
    """A subscriber with a persistent session, so it misses nothing across a broker restart.

    Each message is acknowledged (PUBACK queued) before the test hears of it, and `settle()`
    waits until the broker has processed those acknowledgements: a QoS 1 delivery the broker
    still counts as unacknowledged when it stops is stored and delivered again after the
    restart (at least once), which a test would misread as a second send.
    """

    def __init__(self, port: int, topic: str) -> None:
        self.payloads: list[bytes] = []
        self.topic = topic
        self._cond = threading.Condition()
        self._subacks = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="recorder", clean_session=False,
                                  manual_ack=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        with self._cond:
            assert self._cond.wait_for(lambda: self._subacks >= 1, 10), "recorder could not subscribe"

    def _on_subscribe(self, *args) -> None:
        with self._cond:
            self._subacks += 1
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg) -> None:
        client.ack(msg.mid, msg.qos)  # queued before anything the test sends after hearing of it
        with self._cond:
            self.payloads.append(msg.payload)
            self._cond.notify_all()

    def settle(self, timeout: float = 10) -> None:
        """Return once the broker has processed every PUBACK sent so far: it handles one client's
        packets in order, so its SUBACK to a SUBSCRIBE queued after them proves it."""
        with self._cond:
            wanted = self._subacks + 1
        self.client.subscribe(self.topic, qos=1)
        with self._cond:
            assert self._cond.wait_for(lambda: self._subacks >= wanted, timeout), "no SUBACK from the broker"

    def wait_for_count(self, n: int, timeout: float) -> list[bytes]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.payloads) >= n, timeout), f"got {len(self.payloads)} of {n}"
            return list(self.payloads)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_only_the_newest_update_made_offline_is_sent_on_reconnection(tmp_path):
    broker = Mosquitto(tmp_path / "broker", persistence=True)  # keeps the recorder's session over the restart
    broker.start()
    recorder = session = None
    try:
        recorder = Recorder(broker.port, TOPICS.update("a1"))
        agent = Agent("a1", TOPICS, ArraySource(X[:100], Y[:100]), LocalTrainer(random_state=0), "int8", seed=0)
        session = AgentSession(agent, BrokerSettings.from_url(broker.url), connect_timeout=5)
        lost, back = threading.Event(), threading.Event()
        session.client.on_disconnect = lambda *a: (lost.set(), session._on_disconnect(*a))
        session.start()
        reconnected = session.client.on_connect
        session.client.on_connect = lambda *a: (reconnected(*a), back.set())

        agent.on_model(model_bytes(1))
        sent = []  # the MQTTMessageInfo of each update publish
        publish = session.client.publish
        session.client.publish = lambda topic, *a, **k: (
            info := publish(topic, *a, **k), topic == TOPICS.update("a1") and sent.append(info))[0]
        session.train_and_send()
        first = decode_update(recorder.wait_for_count(1, 10)[0])
        assert first.base_version == 1
        # both QoS 1 legs of the first update complete before the broker stops; else the agent's
        # paho (no PUBACK yet) or the broker (no PUBACK from the recorder yet) sends it again
        # after the restart, as at-least-once delivery must
        sent[0].wait_for_publish(10)
        assert sent[0].is_published(), "the broker did not acknowledge the first update"
        recorder.settle()

        broker.stop()
        assert lost.wait(10), "the session did not notice the broker going away"
        for version in (2, 3):  # two rounds while offline: the second supersedes the first
            agent.on_model(model_bytes(version))
            session.train_and_send()
        assert session.pending.seq == agent.seq_ == first.seq + 2

        broker.start()
        assert back.wait(30), "the session did not reconnect"
        payloads = recorder.wait_for_count(2, 10)
        held = decode_update(payloads[1])
        assert (held.base_version, held.seq) == (3, first.seq + 2)
        assert session.pending is None
        session.close()
        session = None
        assert len(recorder.payloads) == 2  # the superseded update never went out
    finally:
        if session is not None:
            session.close()
        if recorder is not None:
            recorder.close()
        broker.stop()


def test_closing_while_the_broker_is_down_does_not_hang(tmp_path, mosquitto):
    agent = Agent("a1", TOPICS, ArraySource(X[:20], Y[:20]), LocalTrainer())
    session = AgentSession(agent, BrokerSettings.from_url(mosquitto.url), connect_timeout=5)
    lost = threading.Event()
    session.client.on_disconnect = lambda *a: lost.set()
    session.start()
    mosquitto.kill()
    assert lost.wait(10)
    agent.on_model(model_bytes(1))
    session.train_and_send()
    assert session.pending is not None
    done = threading.Thread(target=session.close)
    done.start()
    done.join(15)
    assert not done.is_alive(), "close() blocked on a broker that is gone"
