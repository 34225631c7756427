"""fedmq-monitor on the scale-out tier: a real nats-server (MQTT listener, partition mapping), a root and a worker
as processes, devices publishing updates. The monitor, logged in as the tier user, sees the tier's own topics
(`upd/<P>/<agent>`, `partial/<P>[/counts]`, tier/cluster.py) and the root's status: an agent's updates count
on its partition's topic, a partial is no bad payload, the coordinator row is the root's. Seen red before
Topics.tier_topic: `bad payloads` counted every partial and update as topic:unknown, `upd` 0, no root in the row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tier.fleet import FLEET, START_S, ModelWatch, Publisher, Tier

MONITOR = Path(sys.executable).parent / "fedmq-monitor"


def test_the_monitor_reads_the_tiers_topics_and_the_roots_status(tmp_path, nats_node):
    tier = Tier(nats_node, tmp_path, partitions=nats_node.partitions, buffer_size=2)
    tier.start_root()
    tier.start_worker()
    watch = ModelWatch(nats_node)
    publisher = None
    try:
        assert watch.wait_version_above(-1, START_S) is not None, tier.logs()
        publisher = Publisher(nats_node, watch, agents=3, rate=10, connections=1)
        publisher.start()
        assert watch.wait_version_above(1, 90) is not None, tier.logs()
        login = ["--username", "tier", "--password-file", str(nats_node.write_password_file())]
        common = ["--broker", nats_node.mqtt_urls[0], "--fleet", FLEET, *login, "--once", "--wait", "2"]
        proc = subprocess.run([str(MONITOR), *common, "--json"], capture_output=True, text=True, timeout=60)
        table = subprocess.run([str(MONITOR), *common], capture_output=True, text=True, timeout=60)
    finally:
        if publisher is not None:
            publisher.close()
        watch.close()
        tier.stop()
    assert proc.returncode == 0 and table.returncode == 0, proc.stderr + table.stderr
    snap = json.loads(proc.stdout)
    assert snap["bad"]["count"] == 0, snap["bad"]
    coord = snap["coordinator"]
    assert coord["root"] == "root1" and coord["strategy"] == "tier root", coord
    assert coord["accepted"] >= 2 and coord["partitions"] >= 1 and coord["partials"] >= 1, coord
    assert coord["updated_at"] is not None and coord["version"] >= 2, coord
    assert coord["uptime_s"] > 0 and "   up -" not in table.stdout, (coord, table.stdout)  # the root's uptime_s
    rows = {a["agent"]: a for a in snap["agents"]}
    assert set(rows) <= {"dev0", "dev1", "dev2"} and sum(a["updates_seen"] for a in rows.values()) >= 2, rows
    assert "bad payloads" not in table.stdout and "tier root root1" in table.stdout, table.stdout
