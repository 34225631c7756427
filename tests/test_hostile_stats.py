"""Issue 18, point 1: one agent's feature statistics neither steer the fleet's scaling nor end the coordinator.

Before: one hostile agent's count/sum/sumsq/min/max were merged like anyone's (shifted
statistics took a fleet from 0.95 to 0.63), and statistics whose sum overflowed a re-expressed
model killed the coordinator (exit 1: a model not finite on the wire). Now each vector is
validated (finite, min <= max, a count of at most 10^9, values within 1e100, variance >= 0),
the merge is robust (counts capped at 4x their median, the extreme fifth of the agents trimmed
per feature) and a scaling that would take the model beyond float32 is refused and counted.
Real mosquitto, the real coordinator and 5 real agents on wine in raw units; the hostile
agent is a client publishing statistics.
"""

from __future__ import annotations

import msgpack
import numpy as np

from fleet import TopicWatcher, real_fleet, write_shards
from protocol.statistics import FeatureStats, describe
from protocol.stats_message import encode_stats
from protocol.topics import Topics
from simulation.datasets import load_dataset
from simulation.partition import partition

FLEET = "hoststats"
T = Topics(FLEET)
HONEST = 5
WAIT = 90


def shifted(X: np.ndarray) -> bytes:
    """Statistics of `X` with every mean moved by 100 standard deviations (kept self-consistent)."""
    s = describe(X)
    std = np.sqrt(s.m2 / s.count)
    mean = s.mean + 100 * std
    return encode_stats(FeatureStats(s.count, mean, s.m2, mean - 200 * std, mean + 200 * std))


def raw_stats(n: int, count: float, total: float, squares: float, low: float, high: float) -> bytes:
    vec = lambda v: np.full(n, v, dtype="<f8").tobytes()  # noqa: E731
    return msgpack.packb({"format": 2, "type": "stats", "count": vec(count), "sum": vec(total), "sumsq": vec(squares),
                          "min": vec(low), "max": vec(high)}, use_bin_type=True)


def test_one_hostile_agents_statistics_neither_steer_the_fleet_nor_end_the_coordinator(tmp_path, mosquitto):
    ds = load_dataset("wine", seed=0, raw=True)
    parts = partition(ds.y_train, HONEST + 1, "iid", seed=0)
    shards = write_shards(tmp_path, ds, parts[:HONEST])
    watcher = TopicWatcher(mosquitto.port, T.everything)
    evil = watcher.client
    # the hostile agent's statistics are there first (retained): the first scaling is made with them
    evil.publish(T.stats("evil"), shifted(ds.X_train[parts[HONEST]]), qos=1, retain=True).wait_for_publish(WAIT)
    status = lambda: watcher.json(T.coordinator_status) or {}  # noqa: E731
    try:
        with real_fleet(mosquitto, tmp_path, FLEET, ds, shards, "--eval-csv", tmp_path / "eval.csv",
                        "--publish-interval", "0.3", "--feature-stats", "--stats-min-agents", HONEST + 1) as run:
            trained = watcher.wait_for(lambda: (s := status()).get("statistics", {}).get("agents") == HONEST + 1
                                       and (s.get("accuracy") or 0) >= 0.9 and s, WAIT,
                                       "accuracy >= 0.9 with the shifted statistics merged")
            # statistics whose sum overflows, then huge ones inside every per-message bound
            n = ds.n_features
            evil.publish(T.stats("evil2"), raw_stats(n, 1, 1e308, 1.7e308, -1.7e308, 1.7e308), qos=1).wait_for_publish(WAIT)
            evil.publish(T.stats("evil"), raw_stats(n, 40, 40e99, 40e198, 1e99, 1e99), qos=1).wait_for_publish(WAIT)
            version = status()["version"]
            after = watcher.wait_for(lambda: (s := status()).get("version", 0) >= version + 5
                                     and s["statistics"]["rejected"].get("stats_range") and s, WAIT,
                                     "5 more versions after the overflowing statistics")
            assert run.coordinator.poll() is None, "the coordinator exited"
    finally:
        watcher.close()
    assert run.code == 0
    print(f"\nshifted statistics of 1 of 6 merged: accuracy {trained['accuracy']}; after the overflow "
          f"{after['accuracy']}, rejected {after['statistics']['rejected']}")
    assert after["accuracy"] >= 0.9, after
    assert after["statistics"]["rejected"]["stats_range"] == 1, after["statistics"]


def stats_rows() -> list[str]:
    """The docs table's rows, from bench/results/stats_hostile-before.json and stats_hostile.json."""
    from pathlib import Path
    import json

    results = Path(__file__).resolve().parent.parent / "bench" / "results"
    rows = []
    for label, name in (("before", "stats_hostile-before"), ("now", "stats_hostile")):
        r = json.loads((results / f"{name}.json").read_text())
        for dataset, cell in r["datasets"].items():
            cells = " | ".join(f"{cell[k]['accuracy']:.4f}" for k in ("honest", "shift", "squash", "blowup", "inflate",
                                                                      "overflow"))
            rows.append(f"| {dataset}, {label} | {cells} | {cell['worst_points_below_honest']:.1f} |")
    return rows


def test_docs_security_quotes_the_stats_hostile_results_and_they_hold_2_points():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    md = (root / "docs" / "security.md").read_text()
    for row in stats_rows():
        assert row in md, f"docs/security.md lacks the row {row!r}: regenerate it from bench/results"
    now = json.loads((root / "bench" / "results" / "stats_hostile.json").read_text())
    assert all(cell["worst_points_below_honest"] <= 2.0 for cell in now["datasets"].values()), now
    assert f"means of {now['seeds']} seeds" in md
