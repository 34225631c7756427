"""A restart of the whole fleet (compose down + up: coordinator and agents) is invisible in
accuracy (issue 22 point 5): real coordinator and agent processes on a real mosquitto.

The cause of the dip measured before the fix (0.956 -> 0.80 for ~20 s with the agents alone
restarted, /tmp measurement in the notes): a restarted agent builds a fresh SGDClassifier, whose
'optimal' learning-rate schedule starts again at step 1, a step hundreds of times larger than
the fleet's by then; its first updates pull the model far off. The model message now carries
`steps` (the rows a typical agent trained on) and a fresh estimator starts its schedule there.
"""

from __future__ import annotations

import json
import statistics
import time

import pytest

from fleet import real_fleet, write_shards
from simulation.datasets import load_dataset
from simulation.partition import partition

WAIT = 60


@pytest.mark.slow  # two fleet start-ups of real processes: about a minute on a busy 2-core machine
def test_no_accuracy_drop_beyond_one_point_across_a_restart(tmp_path, mosquitto):
    ds = load_dataset("digits")
    shards = write_shards(tmp_path, ds, partition(ds.y_train, 3, "dirichlet:0.5"))
    log = tmp_path / "metrics.jsonl"
    flags = ("--checkpoint-dir", tmp_path / "ckpt", "--eval-csv", tmp_path / "eval.csv", "--metrics-log", log,
             "--publish-interval", "0.3")

    def statuses() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []

    def wait(predicate, what: str) -> list[dict]:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            found = statuses()
            if predicate(found):
                return found
            time.sleep(0.3)
        raise AssertionError(f"timed out after {WAIT} s waiting for {what}; last: {statuses()[-1:]}")

    with real_fleet(mosquitto, tmp_path, "demo", ds, shards, *flags) as run:
        # each bound counts from the coordinator's first status: six processes starting on a busy
        # 2-core machine took up to 54 s, and version 80 was then 6 s away
        wait(lambda s: s, "the coordinator's first status")
        before = wait(lambda s: s and s[-1]["version"] >= 80, "version 80")
    assert (run.code, run.agent_codes) == (0, [0, 0, 0])
    # the fleet's own spread: the worst of its last 10 statuses; a restart may not go 1 point below it
    baseline = min(s["accuracy"] for s in before[-10:])
    assert statistics.median(s["accuracy"] for s in before[-10:]) >= 0.9, before[-10:]
    mark, last_version = len(statuses()), before[-1]["version"]
    with real_fleet(mosquitto, tmp_path, "demo", ds, shards, *flags):
        wait(lambda s: len(s) > mark, "the restarted coordinator's first status")
        after = wait(lambda s: len([x for x in s[mark:] if x["version"] > last_version]) >= 8,
                     "8 statuses after the restart")[mark:]
    resumed = [s for s in after if s["version"] > last_version]
    assert after[0]["version"] >= last_version, "resumed from the checkpoint"
    worst = min(s["accuracy"] for s in resumed)
    assert worst >= baseline - 0.01, (
        f"accuracy fell from {baseline:.3f} (the worst of the last 10 before) to {worst:.3f} after the restart: "
        f"{[(s['version'], round(s['accuracy'], 3)) for s in resumed]}")
