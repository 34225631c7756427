"""Issue 12 item 2 end to end: the schema comes from the fleet (a coordinator given only --model).

Real mosquitto, real agent and coordinator processes on raw-unit wine: columns in another order (with gaps) are mapped by
name (training, statistics and --eval-csv), an agent whose columns are not the fleet's says
why in its retained status, is counted by the coordinator and never has an update taken.
"""

from __future__ import annotations

import csv
import json

import numpy as np
from sklearn.datasets import load_wine

from fleet import TopicWatcher, spawn, stop
from protocol.messages import decode_model
from protocol.topics import Topics
from simulation.datasets import load_dataset
from simulation.partition import partition

FLEET = "schemafleet"
TOPICS = Topics(FLEET)
NAMES = tuple(load_wine().feature_names)


def _write(path, X, y, names, order, gaps: float = 0.0) -> None:
    """A CSV with the columns `names` in `order` (indices into X's columns), then the label; a
    `gaps` share of the feature cells left empty."""
    rng = np.random.default_rng(7)
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow([names[j] for j in order] + ["label"])
        for xi, yi in zip(X, y):
            out.writerow(["" if rng.random() < gaps else repr(float(xi[j])) for j in order] + [int(yi)])


def _model(watcher):
    raw = watcher.latest.get(TOPICS.model)
    return decode_model(raw, fleet=FLEET) if raw else None


def _status(watcher) -> dict:
    return watcher.json(TOPICS.coordinator_status) or {}


def test_a_coordinator_given_only_the_model_learns_the_schema_from_the_fleet(tmp_path, mosquitto):
    ds = load_dataset("wine", seed=0, raw=True)
    parts = partition(ds.y_train, 4, "iid", seed=0)
    n = ds.n_features
    forward, backward = list(range(n)), list(reversed(range(n)))
    renamed = ("alcohol_pct",) + NAMES[1:]  # one column named otherwise: not the fleet's
    plans = [(NAMES, forward), (NAMES, forward), (NAMES, backward), (renamed, forward)]
    paths = []
    for i, ((names, order), idx) in enumerate(zip(plans, parts)):
        paths.append(tmp_path / f"agent{i}.csv")
        _write(paths[-1], ds.X_train[idx], ds.y_train[idx], names, order, gaps=0.05 if i == 2 else 0.0)
    eval_path = tmp_path / "eval.csv"
    shuffled = list(np.random.default_rng(1).permutation(n))
    _write(eval_path, ds.X_test, ds.y_test, NAMES, shuffled)  # the eval set in a third order
    audit = tmp_path / "audit.jsonl"
    watcher = TopicWatcher(mosquitto.port, TOPICS.everything)
    coordinator = spawn(
        "coordinator", "--broker", mosquitto.url, "--fleet", FLEET, "--model", "sgd-classifier",
        "--schema-agents", "2", "--feature-stats", "--stats-min-agents", "3", "--eval-csv", eval_path,
        "--publish-interval", "0.3", "--audit-log", audit, "--checkpoint-dir", tmp_path / "ckpt",
        log=tmp_path / "coordinator.log")
    agents = [spawn("edge_agent", "--broker", mosquitto.url, "--fleet", FLEET, "--id", "agent0", "--data", paths[0],
                    log=tmp_path / "agent0.log")]
    try:
        watcher.wait_for(lambda: TOPICS.schema("agent0") in watcher.latest, 30, "agent0's schema announcement")
        agents += [spawn("edge_agent", "--broker", mosquitto.url, "--fleet", FLEET, "--id", f"agent{i}",
                         "--data", paths[i], log=tmp_path / f"agent{i}.log") for i in (1, 2)]
        first = watcher.wait_for(lambda: _model(watcher), 60, "the first model")
        assert set(first.spec.columns) == set(NAMES) and first.spec.classes == (0, 1, 2)
        assert first.spec.n_features == n
        # statistics named by column: the scaling is per name whatever each agent's order
        at = [NAMES.index(c) for c in first.spec.columns]
        pooled = np.vstack([ds.X_train[idx] for idx in parts[:2]])  # agent2's gaps: its cells as read
        with paths[2].open(newline="") as fh:
            rows = list(csv.reader(fh))
        gapped = np.array([[float(c) if c else np.nan for c in r[:-1]] for r in rows[1:]])[:, list(reversed(range(n)))]
        pooled = np.vstack([pooled, gapped])
        np.testing.assert_allclose(first.scaling.mean, np.nanmean(pooled, axis=0)[at], rtol=1e-9)
        watcher.wait_for(lambda: (_status(watcher).get("accuracy") or 0) >= 0.9, 60,
                         "accuracy >= 0.9 on the eval set in its own column order")
        reordered = watcher.wait_for(
            lambda: (s := watcher.json(TOPICS.agent_status("agent2")) or {}).get("updates_sent", 0) >= 1 and s,
            30, "the agent with reversed columns (and gaps) to train")
        assert reordered["missing"] > 0 and reordered["scaled"]

        agents.append(spawn("edge_agent", "--broker", mosquitto.url, "--fleet", FLEET, "--id", "agent3",
                            "--data", paths[3], log=tmp_path / "agent3.log"))
        bad = watcher.wait_for(
            lambda: (s := watcher.json(TOPICS.agent_status("agent3")) or {}).get("state") == "error" and s,
            60, "the mismatching agent's error status")
        assert "missing column(s) 'alcohol'" in bad["error"] and "unknown column(s) 'alcohol_pct'" in bad["error"]
        assert bad["updates_sent"] == 0
        schema = watcher.wait_for(lambda: (s := _status(watcher).get("schema", {})).get("mismatched") == 1 and s,
                                  30, "the coordinator to count the mismatching agent")
        assert schema["agents"] == 3 and schema["reasons"]["agent3"] == bad["error"]
        watcher.wait_for(lambda: _status(watcher).get("statistics", {}).get("rejected", {}).get("columns", 0) >= 1,
                         30, "its statistics refused (not merged into the scaling)")
        version = _model(watcher).version
        watcher.wait_for(lambda: (m := _model(watcher)) is not None and m.version > version + 2, 60, "training on")
    finally:
        for proc in agents:
            stop(proc)
        stop(coordinator)
        watcher.close()
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    accepted = [line["topic"] for line in lines if line["outcome"] == "accepted"]
    assert {t.rsplit("/", 1)[1] for t in accepted} == {"agent0", "agent1", "agent2"}  # never from agent3
    assert not [line for line in lines if line["topic"].endswith("/agent3")]
    assert accepted.count(TOPICS.update("agent2")) >= 3  # the reversed columns trained, round after round
