"""fedmq-monitor: the pure FleetView fed real encoded messages and garbage, the rendering, the CLI's
configuration, and `fedmq-monitor --once` as a process against a real coordinator and agents."""

from __future__ import annotations

import io
import json
import queue
import re
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import msgpack
import numpy as np
import pytest
from rich.console import Console

from coordinator.status import build_status, encode_status
from edge_agent.agent import offline_status
from fleet import TopicWatcher, spawn, stop
from monitor.cli import main, parse_args
from monitor.fleet_view import FleetView
from monitor.live import MonitorSession, show_live
from monitor.render import render
from protocol import codec
from protocol.acks import encode_ack
from protocol.messages import ModelMessage, UpdateMessage, encode_model, encode_update
from protocol.model_spec import ModelSpec
from protocol.tabular import write_csv
from protocol.topics import Topics
from protocol.transport import BrokerSettings
from simulation.mosquitto import free_port

FLEET = "mon"
T = Topics(FLEET)
SPEC = ModelSpec("sgd-classifier", 4, (0, 1, 2))
NOW = 1_700_000_000.0
WAIT = 30  # seconds: bound on every wait for the fleet
MONITOR = Path(sys.executable).parent / "fedmq-monitor"


def coordinator_status(version: int, **over) -> bytes:
    fields = dict(fleet=FLEET, strategy="fedasync", version=version, published_version=version, accepted=version,
                  rejected={"decode": 2}, clipped=0, pending=0, staleness_sum=1.5 * version, staleness_max=4,
                  is_classifier=True, scores={"accuracy": 0.91}, fleet_eval={"accuracy": 0.8, "loss": 0.5},
                  agents=2, started_at=NOW - 60, now=NOW)
    return encode_status(build_status(**{**fields, **over}))


def model(version: int) -> bytes:
    return encode_model(ModelMessage(FLEET, version, SPEC, np.zeros(SPEC.n_params), NOW))


def update(agent: str, base: int, seq: int = 1) -> bytes:
    delta = codec.encode(np.full(SPEC.n_params, 0.1), "int8", np.random.default_rng(seq))
    return encode_update(UpdateMessage(agent, seq, base, 20, delta, {"eval_accuracy": 0.75}))


def agent_status(agent: str, state: str = "idle", version: int = 3, **over) -> bytes:
    doc = {"agent": agent, "state": state, "version": version, "model_version": version, "seq": 7,
           "updates_sent": 5, "samples": 120, "codec": "int8", "last_update_time": NOW - 5,
           "metrics": {"eval_accuracy": 0.7, "train_accuracy": 0.9}, "time": NOW - 1}
    return json.dumps({**doc, **over}).encode()


def text_of(snapshot: dict) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(render(snapshot))
    return console.file.getvalue()


# the pure view ---------------------------------------------------------------------------------

def test_coordinator_status_and_model_give_the_fleet_summary():
    view = FleetView(T)
    assert view.feed(T.coordinator_status, coordinator_status(9), NOW) is None
    assert view.feed(T.model, model(8), NOW) is None
    snap = view.snapshot(NOW)
    assert snap["version"] == 9  # the status can be ahead of the published model
    coord = snap["coordinator"]
    assert coord["accepted"] == 9 and coord["rejected"] == {"decode": 2}
    assert coord["accuracy"] == 0.91 and coord["r2"] is None
    assert coord["fleet_eval"] == {"accuracy": 0.8, "loss": 0.5}
    assert coord["staleness"] == {"mean": 1.5, "max": 4} and coord["strategy"] == "fedasync"
    assert snap["model"]["version"] == 8 and snap["model"]["n_params"] == SPEC.n_params
    assert snap["bad"]["count"] == 0 and snap["agents"] == []
    text = text_of(snap)
    assert "version 9 (published 9)" in text and "accuracy 0.9100" in text and "decode 2" in text


def traced_feed(view: FleetView, payload: bytes) -> tuple[str | None, int]:
    """view.feed of a model payload, and tracemalloc's peak meanwhile."""
    tracemalloc.start()
    try:
        return view.feed(T.model, payload, NOW), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_model_beyond_max_model_bytes_is_one_bad_payload_refused_before_its_params_decode():
    """A retained 5 MB int4 model of 10^7 features was decoded whole (float64: ~128 MiB traced) only to show its
    version: the monitor now judges its spec by --max-model-bytes first (one line, counted as a bad payload)."""
    view = FleetView(T)
    spec = ModelSpec("sgd-regressor", 10_000_000)
    payload = encode_model(ModelMessage(T.fleet, 3, spec, np.zeros(spec.n_params), codec="int4"))
    said, peak = traced_feed(view, payload)
    assert said == "model:limits"
    assert peak < 2 * len(payload) + 1_000_000, f"peak {peak} B for a {len(payload)} B model"
    assert view.model is None and view.bad == {"model:limits": 1}
    assert "(--max-model-bytes)" in view.last_bad and "\n" not in view.last_bad, view.last_bad
    assert view.feed(T.model, model(4), NOW) is None and view.model.version == 4  # a usable one after it is shown
    assert FleetView(T, max_model_bytes=4 * spec.n_params).feed(T.model, payload, NOW) is None  # the flag raises it


def test_a_class_count_beyond_max_classes_is_one_bad_payload_refused_before_the_classes_are_built():
    """A ~150-byte model whose spec counts 100,000 classes (the protocol's ceiling) built them all, ~10.6 MiB traced,
    to show its version: the monitor now judges the count by --max-classes (an agent's default, 1,000) first."""
    wire = msgpack.unpackb(model(3))
    payload = msgpack.packb({**wire, "spec": ["sgd-classifier", 4, 100_000, {}]}, use_bin_type=True)
    view = FleetView(T)
    said, peak = traced_feed(view, payload)
    assert said == "model:limits"
    assert peak < 64 * 1024, f"peak {peak} B for a {len(payload)} B model"
    assert view.model is None and view.bad == {"model:limits": 1}
    assert view.last_bad.endswith("the model has 100000 classes, the monitor shows at most 1000 (--max-classes)")
    assert view.feed(T.model, model(4), NOW) is None and view.model.version == 4  # a usable one after it is shown
    assert FleetView(T, max_classes=100_000).feed(T.model, payload, NOW) == "model:shape"  # the flag raises it (its
    # 15 params do not fit 100,000 classes, which are built to find that out)


def test_updates_and_statuses_give_each_agent_its_staleness():
    view = FleetView(T)
    view.feed(T.model, model(10), NOW)
    payload = update("a", base=6)
    view.feed(T.update("a"), payload, NOW + 1)
    view.feed(T.update("a"), update("a", base=7, seq=2), NOW + 2)
    view.feed(T.agent_status("b"), agent_status("b", "training", version=10), NOW)
    snap = view.snapshot(NOW + 3)
    a, b = snap["agents"]
    assert a["agent"] == "a" and a["base_version"] == 7 and a["staleness"] == 3
    assert a["updates_seen"] == 2 and a["last_update_bytes"] == len(payload)
    assert a["last_update_time"] == NOW + 2 and a["state"] is None  # no status yet
    assert b["state"] == "training" and b["staleness"] == 0 and b["updates_sent"] == 5 and b["samples"] == 120
    assert b["metrics"]["eval_accuracy"] == 0.7
    view.feed(T.coordinator_status, coordinator_status(12), NOW + 3)
    assert [x["staleness"] for x in view.snapshot(NOW + 4)["agents"]] == [5, 2]
    text = text_of(view.snapshot(NOW + 4))
    assert "training" in text and "acc 0.750" in text and "2/-" in text and "0/5" in text


def test_last_will_marks_offline_and_keeps_what_was_known():
    view = FleetView(T)
    view.feed(T.agent_status("a"), agent_status("a", "idle", version=3), NOW)
    view.feed(T.agent_status("a"), json.dumps(offline_status("a")).encode(), NOW + 1)
    (a,) = view.snapshot(NOW + 2)["agents"]
    assert a["state"] == "offline" and a["base_version"] == 3 and a["updates_sent"] == 5
    assert "offline" in text_of(view.snapshot(NOW + 2))


def test_empty_retained_payloads_clear_what_the_topic_said():
    view = FleetView(T)
    view.feed(T.agent_status("a"), agent_status("a"), NOW)
    view.feed(T.coordinator_status, coordinator_status(3), NOW)
    view.feed(T.model, model(3), NOW)
    for topic in (T.agent_status("a"), T.coordinator_status, T.model):
        assert view.feed(topic, b"", NOW) is None
    snap = view.snapshot(NOW)
    assert snap["agents"] == [] and snap["coordinator"] is None and snap["model"] is None and snap["version"] is None


GARBAGE = [
    (T.model, b"\xc1 not msgpack", "model:decode"),
    (T.model, encode_model(ModelMessage("other", 1, SPEC, np.zeros(SPEC.n_params))), "model:fleet"),
    (T.update("a"), b"\x00garbage\xff", "update:decode"),
    (T.update("a"), b"", "update:empty"),
    (T.update("a"), update("a", base=1)[:-3], "update:decode"),
    (T.agent_status("a"), b"\xff\xfe\x00", "status:json"),
    (T.agent_status("a"), b"[1, 2]", "status:schema"),
    (T.agent_status("a"), b"[" * 50_000, "status:json"),
    (T.agent_status("a"), agent_status("a", "dancing"), "status:schema"),
    (T.agent_status("a"), agent_status("b"), "status:agent_mismatch"),
    (T.agent_status("a"), b'{"agent": "a", "state": "idle", "pad": "' + b"x" * 70_000 + b'"}', "status:oversize"),
    (T.coordinator_status, b'{"version": "seven"}', "coordinator:schema"),
    (T.coordinator_status, b"NaN", "coordinator:schema"),
    (T.ack("z"), b'{"seq": "one"}', "ack:schema"),
    (f"{T.base}/something/else", b"{}", "topic:unknown"),
]


def test_garbage_is_counted_by_reason_and_never_raises():
    view = FleetView(T)
    view.feed(T.agent_status("a"), agent_status("a"), NOW)
    assert view.feed(T.ack("a"), encode_ack(5), NOW) is None  # an ack (on a broker that lets the monitor read it)
    for topic, payload, reason in GARBAGE:
        assert view.feed(topic, payload, NOW) == reason, (topic, payload[:40])
    snap = view.snapshot(NOW)
    assert snap["bad"]["count"] == len(GARBAGE) and snap["messages"] == len(GARBAGE) + 2
    assert snap["bad"]["reasons"]["status:json"] == 2 and snap["bad"]["last"].startswith(f"{T.base}/something/else")
    (a,) = snap["agents"]  # garbage on a's topics is counted on its row, and makes no new rows
    assert a["bad"] == sum(1 for topic, _, _ in GARBAGE if topic in (T.update("a"), T.agent_status("a")))
    assert a["state"] == "idle" and a["base_version"] == 3  # the good status still stands
    json.dumps(snap, allow_nan=False)
    assert "bad payloads" in text_of(snap)


def test_well_formed_documents_with_hostile_values_are_shown_safely():
    view = FleetView(T)
    doc = {"version": 5, "strategy": "[bold red]boom[/]", "accepted": True, "rejected": {"decode": 1.5, "norm": 3},
           "staleness": "high", "accuracy": 10**400, "fleet_eval": {"accuracy": "good", "loss": 0.25}, "uptime_s": -1}
    assert view.feed(T.coordinator_status, json.dumps(doc).encode(), NOW) is None
    assert view.feed(T.agent_status("a"), agent_status("a", version="x", samples=None, metrics=[1]), NOW) is None
    snap = view.snapshot(NOW)
    coord = snap["coordinator"]
    assert coord["accepted"] is None and coord["rejected"] == {"norm": 3} and coord["accuracy"] is None
    assert coord["staleness"] == {"mean": None, "max": None} and coord["fleet_eval"] == {"loss": 0.25}
    assert snap["agents"][0]["base_version"] is None and snap["agents"][0]["metrics"] == {}
    json.dumps(snap, allow_nan=False)
    assert "[bold red]boom[/]" in text_of(snap)  # shown literally, not as console markup
    assert "mqtt://127.0.0.1:1 lost" in text_of({**snap, "broker": {"url": "mqtt://127.0.0.1:1", "connected": False}})


def test_live_view_draws_the_snapshot_and_returns_on_stop(capsys):
    session = MonitorSession(T, BrokerSettings("127.0.0.1", 1))  # never connected: the screen says so
    session.view.feed(T.agent_status("a7"), agent_status("a7", "training"), NOW)
    stop = threading.Event()
    stop.set()
    show_live(session, 0.1, stop)
    out = capsys.readouterr().out
    assert "a7" in out and "training" in out and "mqtt://127.0.0.1:1 lost" in out


# configuration -------------------------------------------------------------------------------

def test_flags_env_and_toml_are_layered(tmp_path, monkeypatch):
    config = tmp_path / "m.toml"
    config.write_text('fleet = "fromfile"\nbroker = "mqtt://127.0.0.1:1999"\nwait = 5\ntopic-prefix = "lab"\n')
    monkeypatch.setenv("FEDMQ_WAIT", "0.5")
    args = parse_args(["--config", str(config), "--fleet", "cli"])
    assert args.topics == Topics("cli", "lab") and args.wait == 0.5 and args.settings.port == 1999


def run_monitor(*args: str, timeout: float = WAIT) -> subprocess.CompletedProcess:
    return subprocess.run([str(MONITOR), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--broker", "mqtt://127.0.0.1:1"], "--fleet is required"),
    (["--fleet", "f"], "--broker is required"),
    (["--broker", "http://x", "--fleet", "f"], "must look like mqtt://"),
    (["--broker", "mqtt://127.0.0.1:1", "--fleet", "a/b"], "invalid fleet"),
    (["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--wait", "0"], "--wait must be > 0"),
    (["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--max-classes", "1"], "--max-classes must be >= 2, got 1"),
])
def test_bad_configuration_exits_2_with_one_line(args, message, capsys):
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0]


def test_unreachable_broker_exits_1():
    proc = run_monitor("--broker", f"mqtt://127.0.0.1:{free_port()}", "--fleet", "f", "--once")
    assert proc.returncode == 1 and "fedmq-monitor: error: cannot reach broker" in proc.stderr
    assert "Traceback" not in proc.stderr


# a real fleet ----------------------------------------------------------------------------------

def test_once_shows_a_real_fleet_then_an_agent_going_offline(tmp_path, mosquitto):
    rng = np.random.default_rng(0)
    for i in range(2):
        X = rng.normal(size=(60, 4))
        write_csv(tmp_path / f"a{i}.csv", X, (X[:, 0] > 0).astype(int) + (X[:, 1] > 0))
    watcher = TopicWatcher(mosquitto.port, T.everything)
    coord = spawn("coordinator", "--broker", mosquitto.url, "--fleet", FLEET, "--model", "sgd-classifier",
                  "--n-features", 4, "--classes", "0,1,2", "--publish-interval", "0.2", log=tmp_path / "coord.log")
    agents = [spawn("edge_agent", "--broker", mosquitto.url, "--fleet", FLEET, "--id", f"a{i}",
                    "--data", tmp_path / f"a{i}.csv", log=tmp_path / f"a{i}.log") for i in range(2)]
    try:
        def sent(agent):
            return (watcher.json(T.agent_status(agent)) or {}).get("updates_sent", 0)

        watcher.wait_for(lambda: sent("a0") and sent("a1") and
                         (watcher.json(T.coordinator_status) or {}).get("accepted", 0) >= 2, WAIT, "two agents' updates")
        watcher.client.publish(T.agent_status("ghost"), b"\xff not json", qos=1, retain=True).wait_for_publish(WAIT)
        proc = run_monitor("--broker", mosquitto.url, "--fleet", FLEET, "--once", "--wait", "1", "--json")
        assert proc.returncode == 0, proc.stderr
        snap = json.loads(proc.stdout)
        assert snap["version"] >= 2 and snap["coordinator"]["accepted"] >= 2 and snap["model"]["n_params"] == 15
        rows = {a["agent"]: a for a in snap["agents"]}
        assert set(rows) == {"a0", "a1"}
        for row in rows.values():
            assert row["state"] in ("online", "training", "idle") and row["updates_sent"] >= 1
            assert row["base_version"] is not None and 0 <= row["staleness"] <= snap["version"]
        assert snap["bad"]["reasons"] == {"status:json": 1}  # the retained garbage

        assert stop(agents[1]) == 0
        watcher.wait_for(lambda: (watcher.json(T.agent_status("a1")) or {}).get("state") == "offline", WAIT,
                         "a1 offline")
        proc = run_monitor("--broker", mosquitto.url, "--fleet", FLEET, "--once", "--wait", "0.5")
        assert proc.returncode == 0, proc.stderr
        lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip().startswith("a")}
        assert "offline" in lines["a1"] and "offline" not in lines["a0"]
        assert re.search(rf"fleet +{FLEET} +version \d+", proc.stdout) and "bad payloads" in proc.stdout
    finally:
        for proc in agents:
            stop(proc)
        assert stop(coord) == 0
        watcher.close()
    for log in tmp_path.glob("*.log"):
        assert "Traceback" not in log.read_text()


def test_json_stream_survives_a_broker_restart_and_stops_on_sigterm(tmp_path, mosquitto):
    """Without --once: a JSON line per --refresh; the monitor reconnects and resubscribes by itself."""
    publisher = TopicWatcher(mosquitto.port, T.coordinator_status)
    publisher.client.publish(T.coordinator_status, coordinator_status(3), qos=1, retain=True).wait_for_publish(WAIT)
    publisher.close()
    proc = subprocess.Popen([str(MONITOR), "--broker", mosquitto.url, "--fleet", FLEET, "--json", "--refresh", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(json.loads(line)) for line in proc.stdout], daemon=True).start()

    def next_snapshot(predicate, what: str) -> dict:
        deadline = time.monotonic() + WAIT
        while (left := deadline - time.monotonic()) > 0:
            try:
                snap = lines.get(timeout=left)
            except queue.Empty:
                break
            if predicate(snap):
                return snap
        raise AssertionError(f"no snapshot with {what} within {WAIT} s")

    try:
        next_snapshot(lambda s: s["version"] == 3 and s["broker"]["connected"], "version 3")
        mosquitto.restart()  # no persistence: the retained status is gone, the view keeps what it saw
        next_snapshot(lambda s: not s["broker"]["connected"], "the broker lost")
        next_snapshot(lambda s: s["broker"]["connected"], "the broker back")
        publisher = TopicWatcher(mosquitto.port, T.coordinator_status)
        publisher.client.publish(T.coordinator_status, coordinator_status(4), qos=1, retain=True).wait_for_publish(WAIT)
        publisher.close()
        next_snapshot(lambda s: s["version"] == 4, "version 4 after the reconnection")
    finally:
        proc.terminate()
        assert proc.wait(WAIT) == 0
    assert "Traceback" not in proc.stderr.read()


def test_feature_statistics_are_a_known_topic_and_garbage_on_them_is_counted():
    from protocol.statistics import describe
    from protocol.stats_message import encode_stats

    view = FleetView(T)
    assert view.feed(T.stats("a"), encode_stats(describe(np.ones((7, 3)))), NOW) is None
    assert view.snapshot(NOW)["statistics"] == {"a": 7}
    assert view.feed(T.stats("b"), b"\xc1", NOW) == "stats:decode"
    assert view.feed(T.stats("a"), b"", NOW) is None  # cleared
    assert view.snapshot(NOW)["statistics"] == {}


def test_schema_announcements_are_a_known_topic_and_garbage_on_them_is_counted():
    from protocol.schema import Schema, encode_schema

    view = FleetView(T)
    assert view.feed(T.schema("a"), encode_schema(Schema(("t", "p"), (0, 1))), NOW) is None
    assert view.snapshot(NOW)["schema"] == {"a": 2}
    assert view.feed(T.schema("b"), b"\xc1", NOW) == "schema:decode"
    assert view.feed(T.schema("a"), b"", NOW) is None  # cleared
    assert view.snapshot(NOW)["schema"] == {}


def status_in(state: str, agent_id: str) -> bytes:
    """The retained status a real `Agent` publishes in `state` (issue 22 point 3)."""
    from edge_agent.agent import NO_MODEL, Agent
    from edge_agent.data import ArraySource
    from edge_agent.trainer import LocalTrainer

    agent = Agent(agent_id, T, ArraySource(np.zeros((4, 4)), np.zeros(4, dtype=int)), LocalTrainer())
    agent.on_model(model(3))
    if state == "error":
        agent.error_ = (3, "columns do not match the fleet's: missing column(s) 'alcohol'")
    elif state == "unheard":
        agent.set_unheard(NO_MODEL, f"no model on {T.model} within 120 s (check --fleet)")
    doc = agent.status(None if state in ("error", "unheard", "online") else state)
    assert doc["state"] == state, doc
    return json.dumps(doc).encode()


def test_once_shows_every_agent_state_with_its_reason(mosquitto):
    """Every state protocol/agent_states.py lists, as the agent publishes it, is a row; error and unheard with why."""
    from protocol.agent_states import REASON_FIELDS, STATES

    watcher = TopicWatcher(mosquitto.port, T.everything)
    try:
        for state in STATES:
            watcher.client.publish(T.agent_status(f"in-{state}"), status_in(state, f"in-{state}"), qos=1,
                                   retain=True).wait_for_publish(WAIT)
        proc = run_monitor("--broker", mosquitto.url, "--fleet", FLEET, "--once", "--wait", "1", "--json")
        table = run_monitor("--broker", mosquitto.url, "--fleet", FLEET, "--once", "--wait", "1")
    finally:
        watcher.close()
    assert proc.returncode == 0 and table.returncode == 0, proc.stderr + table.stderr
    snap = json.loads(proc.stdout)
    rows = {a["agent"]: a for a in snap["agents"]}
    assert snap["bad"]["count"] == 0, snap["bad"]
    assert {rows[f"in-{s}"]["state"] for s in STATES if f"in-{s}" in rows} == set(STATES), rows
    assert "alcohol" in rows["in-error"]["reason"] and "--fleet" in rows["in-unheard"]["reason"]
    assert set(REASON_FIELDS) == {"error", "unheard"}
    assert f"{len(STATES)} agents" in table.stdout, table.stdout
    for state in STATES:
        line = next(line for line in table.stdout.splitlines() if f"in-{state} " in line)
        assert state in line, line
    words = " ".join(table.stdout.split())  # the reason column folds long reasons over lines
    assert "'alcohol'" in words and "(check --fleet)" in words, table.stdout


def tier_messages() -> list[tuple[str, bytes]]:
    """What a subscriber of the fleet's `#` on the scale-out tier gets, encoded by the tier's own code: an agent's
    update and update chunk on its partition's topics (tier/cluster.py's mapping), a secure-aggregation share, a
    worker's partial and counts (tier/partial.py) and the root's retained status (tier/root.py `Root.status`)."""
    import time
    from types import SimpleNamespace

    from tier.partial import Counts, Partial, encode_counts, encode_partial
    from tier.root import Root

    root = SimpleNamespace(topics=T, root_id="root7", published=6, folded=11, partials=4, duplicates=0, rejected=0,
                           updates_rejected={"2": {"decode": 3}}, hwm={"2": 4, "3": 1}, dp=None, secagg=None,
                           rule=SimpleNamespace(weight_capped=0, repeat_agent=0, buffer=lambda: None), spec=SPEC,
                           scores={"accuracy": 0.75}, started_at=time.time() - 90)
    partial = f"{T.base}/partial/2"
    return [(T.coordinator_status, encode_status(Root.status(root, None))),
            (f"{T.base}/upd/2/a1", update("a1", base=5, seq=1)), (f"{T.base}/upd/2/a1", update("a1", base=6, seq=2)),
            (f"{T.base}/updc/2/a1", b"\x93\x01\x02\x03"), (f"{T.base}/psecagg/3/share/a2", b"\x90"),
            (partial, encode_partial(Partial(2, 1, 4, np.ones(SPEC.n_params), 2.0, 2, [("a1", 1, 5), ("a1", 2, 6)]))),
            (f"{partial}/counts", encode_counts(Counts(2, {"decode": 3})))]


def test_the_tiers_topics_are_known_and_the_roots_status_is_the_coordinator_row():
    """On the tier an update travels on upd/<P>/<agent>: counted for its agent; partials are no bad payload; the root's
    status fills the coordinator row. Seen red without Topics.tier_topic and root_as_coordinator (topic:unknown 6,
    upd 0, coordinator row '? - agents')."""
    view = FleetView(T)
    for topic, payload in tier_messages():
        assert view.feed(topic, payload, NOW) is None, topic
    snap = view.snapshot(NOW + 1)
    assert snap["bad"]["count"] == 0 and snap["agents"][0]["agent"] == "a1" and len(snap["agents"]) == 1
    assert snap["agents"][0]["updates_seen"] == 2 and snap["agents"][0]["base_version"] == 6
    coord = snap["coordinator"]
    assert (coord["version"], coord["accepted"], coord["rejected"], coord["partials"]) == (6, 11, {"decode": 3}, 4)
    assert coord["updated_at"] is not None and coord["partitions"] == 2
    assert coord["uptime_s"] >= 90 and "   up 1m" in text_of(snap)  # the root's own uptime_s
    text = text_of(snap)
    assert "tier root root7   2 partitions   4 partials" in text and "accepted 11   rejected 3 (decode 3)" in text
    assert coord["accuracy"] == 0.75 and "accuracy 0.7500" in text  # the root's --eval-csv score
    assert "bad payloads" not in text
    for topic in (f"{T.base}/upd/x/a1", f"{T.base}/partial/2/other", f"{T.base}/psecagg/3/nokind/a2"):
        assert view.feed(topic, b"\x90", NOW) == "topic:unknown", topic  # near misses are still unknown
