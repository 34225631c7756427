"""Issue 18 point 6: the fleet's schema comes from a majority of its agents, not from one.

Real mosquitto, real coordinator (given only --model) and agent processes. One hostile agent
announces columns x, y before anyone else and the coordinator fixes them; when the three
honest agents announce theirs, that schema has lost its majority and is discovered again:
the honest agents train, the hostile one is the outlier, and a label set inflated to 1,000
labels is refused with a reason. A restart keeps the fleet's schema. Seen red on main: every
honest agent in state error ("missing column(s) 'f0', ...") and the fleet at version 0, also after
the hostile agent left and the coordinator restarted.
"""

from __future__ import annotations

import time
import urllib.request

from sklearn.datasets import load_digits

from fleet import TopicWatcher, spawn, stop
from protocol.messages import decode_model
from protocol.schema import Schema, encode_schema
from protocol.tabular import write_csv
from protocol.topics import Topics
from simulation.mosquitto import free_port

T = Topics("majority")
WAIT = 60


def _status(watcher) -> dict:
    return watcher.json(T.coordinator_status) or {}


def test_one_agent_announcing_first_is_the_outlier_never_the_fleet(tmp_path, mosquitto):
    X, y = load_digits(return_X_y=True)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"h{i}.csv")
        write_csv(paths[-1], X[i::3][:300], y[i::3][:300])
    watcher = TopicWatcher(mosquitto.port, T.everything)
    evil = Schema(("x", "y"), (0, 1))
    watcher.client.publish(T.schema("evil"), encode_schema(evil), qos=1, retain=True).wait_for_publish(10)

    metrics_port = free_port()

    def coordinator(name: str):
        return spawn("coordinator", "--broker", mosquitto.url, "--fleet", T.fleet, "--model", "sgd-classifier",
                     "--checkpoint-dir", tmp_path / "ckpt", "--metrics-port", metrics_port,
                     "--publish-interval", "0.3", log=tmp_path / f"{name}.log")

    coord = coordinator("coordinator")
    honest = []
    try:
        watcher.wait_for(lambda: _status(watcher).get("schema", {}).get("columns") == ["x", "y"], WAIT,
                         "the hostile agent's columns, alone on the fleet, to be taken")
        honest = [spawn("edge_agent", "--broker", mosquitto.url, "--fleet", T.fleet, "--id", f"h{i}", "--data", p,
                        log=tmp_path / f"h{i}.log") for i, p in enumerate(paths)]
        inflated = Schema(tuple(f"f{i}" for i in range(64)), tuple(range(1000)))  # the fleet's columns, 1,000 labels
        watcher.client.publish(T.schema("evil2"), encode_schema(inflated), qos=1, retain=True).wait_for_publish(10)
        schema = watcher.wait_for(lambda: (s := _status(watcher)).get("version", 0) >= 3
                                  and (s.get("fleet_eval", {}).get("accuracy") or 0) >= 0.8 and s["schema"], WAIT,
                                  "the honest fleet's schema, discovered again, to train")
        assert len(schema["columns"]) == 64 and schema["agents"] >= 3, schema
        assert "missing column(s) 'f0'" in schema["reasons"]["evil"], schema
        assert "labels refused" in schema["reasons"]["evil2"], schema
        assert schema["rediscovered"] >= 1 and schema["rejected"].get("labels", 0) >= 1, schema
        assert decode_model(watcher.latest[T.model]).spec.classes == tuple(range(10))  # not the 1,000
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=20).read().decode()
        assert f'fedmq_schema_rediscovered_total{{fleet="{T.fleet}"}} 1.0' in body
        assert f'fedmq_schema_rejected_total{{fleet="{T.fleet}",reason="labels"}}' in body
        for i in range(3):
            state = (watcher.json(T.agent_status(f"h{i}")) or {}).get("state")
            assert state != "error", (i, watcher.json(T.agent_status(f"h{i}")))
        version = _status(watcher)["version"]
        assert stop(coord) == 0
        restarted_at = time.time()
        coord = coordinator("coordinator2")
        watcher.wait_for(lambda: (s := _status(watcher)).get("started_at", 0) >= restarted_at
                         and s["version"] >= version + 2, WAIT, "the restarted coordinator to train on")
        assert len(_status(watcher)["schema"]["columns"]) == 64
    finally:
        for proc in honest:
            stop(proc)
        code = stop(coord)
        watcher.close()
    assert code == 0
    log = (tmp_path / "coordinator.log").read_text()
    assert "lost its majority" in log, log[-2000:]
