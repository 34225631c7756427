"""Issue 20, pace steering in the scale-out tier: the root counts the agents online from their retained
statuses (through the NATS MQTT listener) and every model it publishes carries the pace for that count.

A real 3-node NATS cluster, one partition worker, the root with --target-updates-per-s and real agent
processes that, unsteered, train on every newer model (the root publishes up to 5 a second). Checked:
the root's status says the agents online and the steered interval (agents / RATE), the retained model
carries that interval, the updates folded by the root (its audit log) come at about RATE a second, and a
root started after the agents were online (so it can only count them from the retained statuses the
cluster replays) takes over after a kill -9 of the first and publishes the same pace; hostile retained
statuses count for neither root.
Seen red: without the root's steering no status names the agents online; with the pace left out of
the model (the count and the status kept) the agents ran unsteered and the folded rate was far above RATE.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from fleet import spawn, stop_all
from protocol.tabular import write_csv
from tier import root as tier_root
from tier.fleet import FLEET, TOPICS, ModelWatch, Tier, read_audit, wait_until

AGENTS = 6
RATE = 2.0  # updates a second wanted from the whole fleet: each agent every AGENTS / RATE = 3 s
WINDOW_S = 9.0
INTERVAL = AGENTS / RATE


def _pace(watch: ModelWatch) -> dict:
    return watch.status.get("pace") or {}


def test_the_root_steers_the_fleet_to_the_target_rate_and_a_new_root_recounts(tmp_path, nats_cluster):
    tier = Tier(nats_cluster, tmp_path, partitions=4, buffer_size=2,
                spec_args=("--model", "sgd-classifier", "--n-features", 3, "--classes", "0,1"),
                root_args=("--strategy", "fedbuff", "--target-updates-per-s", RATE, "--pace-min-interval", "0.5"))
    watch = ModelWatch(nats_cluster)
    agents = []
    rng = np.random.default_rng(0)
    try:
        tier.start_worker()
        first = tier.start_root()
        for i in range(AGENTS):
            X = rng.normal(size=(60, 3))
            write_csv(tmp_path / f"dev-{i}.csv", X, (X[:, 0] > 0).astype(int))
            url = nats_cluster.mqtt_urls[i % len(nats_cluster.mqtt_urls)]  # devices spread over the nodes
            agents.append(spawn("edge_agent", "--broker", url, "--fleet", FLEET, "--id", f"dev-{i}",
                                "--data", tmp_path / f"dev-{i}.csv", "--seed", i, log=tmp_path / f"dev-{i}.log"))
        # (started with the tier: they wait for its first model). Hostile statuses, retained (so a later root's
        # replay has them too), must not count: unreadable, not a map, and "online" but over the size bound
        assert watch.links[0].wait(30)
        for agent, payload in (("evil-1", b"\xff\xfe"), ("evil-2", b"[1, 2]"),
                               ("evil-3", json.dumps({"state": "online", "pad": "x" * 20_000}).encode())):
            watch.links[0].client.publish(TOPICS.agent_status(agent), payload, qos=1, retain=True).wait_for_publish(10)
        assert wait_until(lambda: _pace(watch).get("agents_online") == AGENTS, 90), (watch.status, tier.logs())
        assert _pace(watch)["interval"] == INTERVAL and _pace(watch)["jitter"] == 0.5, watch.status
        steered_at = watch.status["version"]  # every model from this one on asks for the 6-agent pace
        assert wait_until(lambda: watch.latest.version >= steered_at, 10)
        assert watch.latest.pace is not None and watch.latest.pace.interval == INTERVAL, watch.latest.pace

        # each agent has learnt the pace once it sent an update trained on a steered model; then measure
        def paced() -> set[str]:
            return {r["agent"] for r in read_audit(tier.audit) if r["base"] >= steered_at}
        assert wait_until(lambda: len(paced()) == AGENTS, 2 * INTERVAL * 1.5 + 20), (paced(), tier.logs())
        start = time.time()
        time.sleep(WINDOW_S)  # a measuring window, not synchronisation
        end = time.time()
        assert wait_until(lambda: any(r["t"] >= end for r in read_audit(tier.audit)), 10)  # the window is folded
        folded = [r for r in read_audit(tier.audit) if start <= r["t"] < end]
        rate = len(folded) / (end - start)
        print(f"folded {rate:.2f} updates/s for a target of {RATE} ({AGENTS} agents, interval {INTERVAL} s)")
        assert 0.5 * RATE <= rate <= 1.5 * RATE, (rate, json.dumps(watch.status))

        # a root that starts now learns the agents online only from the retained statuses the cluster replays
        standby = tier.start_root()
        assert tier.wait_up(standby, 40), tier.logs()
        tier.kill(first)
        assert wait_until(lambda: watch.status.get("root") == standby and _pace(watch).get("agents_online") == AGENTS,
                          30), (watch.status, tier.logs())
        assert _pace(watch)["interval"] == INTERVAL, watch.status
    finally:
        stop_all(agents)
        watch.close()
        tier.stop()


@pytest.mark.parametrize("flags, message", [
    (["--target-updates-per-s", "5", "--secure-aggregation"], "does not combine with --secure-aggregation"),
    (["--target-updates-per-s", "5", "--pace-min-interval", "0"], "0 < min <= max interval"),
    (["--target-updates-per-s", "-1"], "target > 0"),
    (["--target-updates-per-s", "5", "--pace-jitter", "1"], "jitter in"),
])
def test_the_root_refuses_the_pace_the_coordinator_refuses(flags, message, capsys):
    code = tier_root.main(["--nats", "nats://127.0.0.1:1", "--mqtt", "mqtt://127.0.0.1:1", "--fleet", "f",
                           "--model", "sgd-regressor", "--n-features", "3", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_tier_up_hands_the_pace_to_the_root_as_the_roots_own_flag():
    from tier import up

    common = ["--nats", "nats://127.0.0.1:1", "--mqtt", "mqtt://127.0.0.1:1", "--fleet", "f"]
    steered = tier_root.build_parser().parse_args(common + up.root_args(up.build_parser().parse_args(
        ["--target-updates-per-s", "25"])))
    assert steered.target_updates_per_s == 25.0 and steered.model == "sgd-classifier"
    plain = tier_root.build_parser().parse_args(common + up.root_args(up.build_parser().parse_args([])))
    assert plain.target_updates_per_s == 0.0
