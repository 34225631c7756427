"""Issue 12 end to end: raw-unit CSVs with gaps, a coordinator with --feature-stats, a late joiner.

Real mosquitto, real agent and coordinator processes, real scikit-learn.
"""

from __future__ import annotations

import csv

import json

import numpy as np

from fleet import TopicWatcher, spawn, stop
from protocol.messages import decode_model
from protocol.tabular import load_csv, write_csv
from protocol.topics import Topics
from simulation.datasets import load_dataset
from simulation.partition import partition

FLEET = "rawdata"
TOPICS = Topics(FLEET)


def _punch_gaps(path, rng, share: float, empty: bool) -> int:
    """Blank (or write NaN into) a share of the feature cells of a CSV; returns how many."""
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    n = 0
    for row in rows[1:]:
        for j in range(len(row) - 1):
            if rng.random() < share:
                row[j] = "" if empty else "NaN"
                n += 1
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return n


def _model(watcher):
    raw = watcher.latest.get(TOPICS.model)
    return decode_model(raw, fleet=FLEET) if raw else None


def _status(watcher):
    return watcher.json(TOPICS.coordinator_status) or {}


def test_raw_units_with_gaps_learn_and_a_late_joiner_refines_the_scaling(tmp_path, mosquitto):
    ds = load_dataset("wine", seed=0, raw=True)  # proline near 1000 beside hue near 1
    rng = np.random.default_rng(0)
    parts = partition(ds.y_train, 4, "iid", seed=0)
    paths = []
    for i, idx in enumerate(parts):
        paths.append(tmp_path / f"agent{i}.csv")
        write_csv(paths[-1], ds.X_train[idx], ds.y_train[idx])
    gaps = _punch_gaps(paths[0], rng, 0.05, empty=True) + _punch_gaps(paths[1], rng, 0.05, empty=False)
    assert gaps > 0
    eval_path = tmp_path / "eval.csv"
    write_csv(eval_path, ds.X_test, ds.y_test)
    _punch_gaps(eval_path, rng, 0.02, empty=True)
    watcher = TopicWatcher(mosquitto.port, TOPICS.everything)
    coordinator = spawn(
        "coordinator", "--broker", mosquitto.url, "--fleet", FLEET, "--model", "sgd-classifier",
        "--classes", "0,1,2", "--n-features", ds.n_features, "--eval-csv", eval_path, "--publish-interval", "0.3",
        "--checkpoint-dir", tmp_path / "ckpt", "--feature-stats", "--stats-min-agents", "3",
        "--audit-log", tmp_path / "audit.jsonl",
        log=tmp_path / "coordinator.log")
    agents = [spawn("edge_agent", "--broker", mosquitto.url, "--fleet", FLEET, "--id", f"agent{i}", "--data", paths[i],
                    log=tmp_path / f"agent{i}.log") for i in range(3)]
    try:
        first = watcher.wait_for(lambda: _model(watcher), 60, "the first model")
        assert first.scaling is not None  # it waited for three agents' statistics
        pooled = np.vstack([load_csv(p)[0] for p in paths[:3]])
        np.testing.assert_allclose(first.scaling.mean, np.nanmean(pooled, axis=0), rtol=1e-9)
        np.testing.assert_allclose(first.scaling.scale, np.nanstd(pooled, axis=0), rtol=1e-7)
        watcher.wait_for(lambda: (_status(watcher).get("accuracy") or 0) >= 0.9, 60, "accuracy >= 0.9 on raw units")
        for i in (0, 1):  # the gaps were imputed with the fleet mean and counted
            status = watcher.wait_for(lambda: (watcher.json(TOPICS.agent_status(f"agent{i}")) or {}).get("missing"),
                                      30, f"agent{i} to count its missing cells")
            assert status > 0 and watcher.json(TOPICS.agent_status(f"agent{i}"))["scaled"]

        agents.append(spawn("edge_agent", "--broker", mosquitto.url, "--fleet", FLEET, "--id", "agent3",
                            "--data", paths[3], log=tmp_path / "agent3.log"))
        pooled = np.vstack([load_csv(p)[0] for p in paths])
        refined = watcher.wait_for(
            lambda: (m := _model(watcher)) is not None and np.allclose(m.scaling.mean, np.nanmean(pooled, axis=0),
                                                                         rtol=1e-9) and m,
            60, "a model scaled with all four agents' statistics")
        np.testing.assert_allclose(refined.scaling.scale, np.nanstd(pooled, axis=0), rtol=1e-7)
        watcher.wait_for(lambda: _status(watcher).get("statistics", {}).get("agents") == 4, 30, "statistics of 4 agents")
        # re-expressed, not thrown away: the refined model still classifies (and keeps learning)
        watcher.wait_for(lambda: (m := _model(watcher)) is not None and m.version > refined.version
                         and (_status(watcher).get("accuracy") or 0) >= 0.9, 60, "accuracy >= 0.9 after refining")
        # the statistics stay on their own retained topic per agent
        assert set(t for t in watcher.latest if t.startswith(f"fedmq/{FLEET}/stats/")) == \
            {TOPICS.stats(f"agent{i}") for i in range(4)}
    finally:
        for proc in agents:
            stop(proc)
        stop(coordinator)
        watcher.close()
    # the audit log says what the norm bound judged: the distance of each agent's model from the current one
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    judged = [r for r in records if "norm" in r]
    assert judged and all(r["norm"] > r["norm_limit"] for r in records if r["outcome"] == "norm")
