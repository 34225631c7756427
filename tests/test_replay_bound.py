"""Issue 18, point 4: the replay state has a default bound set by a memory budget.

Before: the bound was 1,000,000 agents and 300,000 ids grew a coordinator from 128 to
198 MB with no bound reached. Now `--max-agents` defaults to REPLAY_BUDGET_BYTES /
BYTES_PER_AGENT (64 MiB at 512 bytes: 131,072), it is in the status (`max_agents`) and in
Prometheus, and an agent beyond it is refused (too_many_agents).
"""

from __future__ import annotations

import time
import tracemalloc
import urllib.request

import msgpack
import numpy as np

from coordinator.validation import BYTES_PER_AGENT, DEFAULT_MAX_AGENTS, REPLAY_BUDGET_BYTES, UpdateValidator
from fleet import TopicWatcher, spawn, stop
from protocol import codec
from protocol.messages import UpdateMessage, encode_update
from protocol.topics import Topics
from simulation.mosquitto import free_port

T = Topics("replay")
WAIT = 60


def update(agent: str, n_params: int = 3) -> bytes:
    enc = codec.encode(np.zeros(n_params), "int8", np.random.default_rng(0))
    return encode_update(UpdateMessage(agent, int(time.time() * 1e6), 0, 10, enc, {}))


def agent_id(i: int) -> str:
    return f"{i:064d}"  # the longest id a topic may name: the most memory per agent


def test_the_default_bound_holds_the_replay_state_and_its_commit_inside_the_budget():
    assert DEFAULT_MAX_AGENTS == REPLAY_BUDGET_BYTES // BYTES_PER_AGENT == 131_072
    validator = UpdateValidator(T, 3)
    assert validator.max_agents == DEFAULT_MAX_AGENTS
    seq = int(time.time() * 1e6)
    tracemalloc.start()
    try:
        # the state at the bound less one, as a checkpoint restores it; then the last agent through `check`
        validator.restore({agent_id(i): seq for i in range(DEFAULT_MAX_AGENTS - 1)})
        assert validator.check(T.update(agent_id(DEFAULT_MAX_AGENTS)), update("x"), 0).reason is None
        assert len(validator.highest_seq) == DEFAULT_MAX_AGENTS
        # what a commit makes of it: the checkpoint's copy of the dict and its msgpack, twice (state, file)
        copy = dict(validator.highest_seq)
        body = msgpack.packb({"highest_seq": copy}, use_bin_type=True)
        blob = msgpack.packb({"state": body}, use_bin_type=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del copy, body, blob
    assert validator.check(T.update("one-more"), update("x"), 0).reason == "too_many_agents"
    assert validator.check(T.update(agent_id(5)), update("x"), 0).reason is None  # known agents still go on
    print(f"\nreplay state at {DEFAULT_MAX_AGENTS} agents with its commit: peak {peak / 2**20:.1f} MiB "
          f"({peak / DEFAULT_MAX_AGENTS:.0f} B per agent; budget {REPLAY_BUDGET_BYTES / 2**20:.0f} MiB)")
    assert peak <= REPLAY_BUDGET_BYTES, f"{peak / 2**20:.1f} MiB at the bound, the budget is 64 MiB"


def test_a_real_coordinator_refuses_the_agent_past_its_bound_and_says_so(mosquitto, tmp_path):
    port = free_port()
    watcher = TopicWatcher(mosquitto.port, T.everything)
    coordinator = spawn("coordinator", "--broker", mosquitto.url, "--fleet", T.fleet, "--model", "sgd-classifier",
                        "--n-features", 1, "--classes", "0,1", "--publish-interval", "0.2", "--max-agents", 20,
                        "--metrics-port", port, log=tmp_path / "coordinator.log")
    status = lambda: watcher.json(T.coordinator_status) or {}  # noqa: E731
    try:
        first = watcher.wait_for(status, WAIT, "the coordinator's status")
        assert first["max_agents"] == 20
        for i in range(25):
            watcher.client.publish(T.update(agent_id(i)), update(agent_id(i), 2), qos=1).wait_for_publish(WAIT)
        final = watcher.wait_for(lambda: (s := status()).get("accepted", 0) + sum(s["rejected"].values()) >= 25 and s,
                                 WAIT, "all 25 updates handled")
        assert final["accepted"] == 20 and final["rejected"] == {"too_many_agents": 5}, final
        assert final["agents"] == 20 and final["max_agents"] == 20
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'fedmq_agents_max{fleet="replay"} 20.0' in metrics
        assert 'fedmq_updates_rejected_total{fleet="replay",reason="too_many_agents"} 5.0' in metrics
    finally:
        watcher.close()
        assert stop(coordinator) == 0
