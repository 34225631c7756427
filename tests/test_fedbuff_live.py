"""Issue 18 point 5: --strategy fedbuff on a fleet smaller than its buffer makes progress.

Real mosquitto, real coordinator and agent processes: with the default buffer (K=5) and 3
agents, the coordinator steps once the agents online have all sent (K = min(K, live agents),
read from their retained statuses and last wills), not once per --buffer-timeout. Seen red
on the fixed K: version 1 came only after the 30 s buffer timeout.
"""

from __future__ import annotations

import time
import urllib.request

from fleet import TopicWatcher, real_fleet, stop, write_shards
from protocol.topics import Topics
from simulation.datasets import load_dataset
from simulation.mosquitto import free_port
from simulation.partition import partition

FLEET = "smallbuff"
T = Topics(FLEET)


def _status(watcher) -> dict:
    return watcher.json(T.coordinator_status) or {}


def test_three_agents_reach_five_versions_and_085_in_45_s_with_the_default_buffer(tmp_path, mosquitto):
    ds = load_dataset("digits", seed=0)
    shards = write_shards(tmp_path, ds, partition(ds.y_train, 3, "iid", seed=0), prefix="agent")
    metrics_port = free_port()
    watcher = TopicWatcher(mosquitto.port, T.everything)
    started = time.monotonic()
    try:
        with real_fleet(mosquitto, tmp_path, FLEET, ds, shards, "--strategy", "fedbuff", "--eval-csv", tmp_path / "eval.csv",
                        "--publish-interval", "0.3", "--checkpoint-dir", tmp_path / "ckpt",
                        "--metrics-port", metrics_port) as run:
            done = watcher.wait_for(lambda: (s := _status(watcher)).get("version", 0) >= 5
                                    and (s.get("accuracy") or 0) >= 0.85 and s, 45, "5 versions and accuracy >= 0.85")
            elapsed = time.monotonic() - started
            assert done["buffer_timeouts"] == 0, done  # every step was a full (live-sized) buffer
            buffer = done["buffer"]  # K is the agents online less any refused since the last step (none held)
            assert (buffer["size"], buffer["live_agents"], buffer["effective"]) == (5, 3, 3 - buffer["refused_since_step"]), done
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=20).read().decode()
            assert f'fedmq_buffer_effective_size{{fleet="{FLEET}"}} 3.0' in body
            assert f'fedmq_live_agents{{fleet="{FLEET}"}} 3.0' in body

            stop(run.agents.pop())  # one leaves (its status says offline): the buffer shrinks to the two left
            watcher.wait_for(lambda: _status(watcher).get("buffer", {}).get("effective") == 2, 30,
                             "the buffer to follow the agents online")
            version = _status(watcher)["version"]
            watcher.wait_for(lambda: _status(watcher).get("version", 0) >= version + 2, 30,
                             "two more versions from two agents")
            assert _status(watcher)["buffer_timeouts"] == 0
    finally:
        watcher.close()
    assert run.code == 0
    print(f"5 versions and accuracy >= 0.85 after {elapsed:.1f} s")
