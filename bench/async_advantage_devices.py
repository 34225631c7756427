"""Per device, one fedmq run of bench/async_advantage.py's task: each device's pad, updates sent, model
downloads, subscriptions and the coordinator's acks of it (its accepted updates), and the coordinator's
rejections by reason (issue 23: which devices the fleet hears, and what each update costs in downloads).

Counts come from the capture (bench/device_bytes.pcap_bytes per connection: PUBLISH model and ack packets
down, SUBSCRIBE up) and the devices' logs; the rejections from the coordinator's log (its rejection summaries,
once per reason every 10 s: the last < 10 s are not in them). Appends one JSON line a run to --out.

    python bench/async_advantage_devices.py --seed 0 --seconds 60 "NAME" "--strategy fedbuff [--agents ...]"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import async_advantage as aa  # noqa: E402
from bench.device_bytes import pcap_bytes  # noqa: E402

REJECTED = re.compile(r"rejected (\d+) update\(s\) as (\w+) \(latest on ")


def device_rows(probes: list, pads: list[float], wire: dict) -> list[dict]:
    """One row per device from its probe, pad and connection's kinds in `wire` (pcap_bytes)."""
    rows = []
    for i, (probe, pad) in enumerate(zip(probes, pads)):
        conn = wire.get(probe.port, {})
        kinds = conn.get("kinds", {})
        rows.append({"agent": i, "pad": round(pad, 3), "updates": probe.updates_sent(False),
                     "models": kinds.get("down PUBLISH model", [0, 0])[1],
                     "subscribes": kinds.get("up SUBSCRIBE", [0, 0])[1],
                     "acks": kinds.get("down PUBLISH ack", [0, 0])[1],
                     "bytes": conn.get("up", 0) + conn.get("down", 0)})
    return rows


def rejections(coordinator_log: str) -> dict[str, int]:
    """Rejected updates by reason, summed over the coordinator's rejection summaries."""
    out: dict[str, int] = {}
    for n, reason in REJECTED.findall(coordinator_log):
        out[reason] = out.get(reason, 0) + int(n)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=60.0, help="the run's time from its first local round")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "async_advantage_devices.jsonl")
    p.add_argument("name")
    p.add_argument("flags", help="coordinator flags, then --agents and the agents' flags (as async_advantage's --fedmq)")
    a = p.parse_args()
    task_args = argparse.Namespace(dataset="many_classes", partition="shards:4", agents=10, round_time=0.5, sigma=1.0)
    with tempfile.TemporaryDirectory(prefix="async-devices-") as tmp:
        task = aa.write_task(Path(tmp) / "task", task_args, a.seed)
        probes, capture, port, timeline, end = aa.run_fedmq(Path(tmp) / "run", task, a.flags.split(), a.seconds)
        row = aa.figures(a.name, probes, capture, port, timeline, task.ceiling, end)
        log = (Path(tmp) / "run" / "coordinator.log").read_text(errors="replace")
        out = {"name": a.name, "seed": a.seed, "flags": a.flags, "final": row["final_accuracy"],
               "best": max((acc for _, acc, _ in row["timeline"]), default=None), "t90": row["time_to_90_s"],
               "t95": row["time_to_95_s"], "ceiling": round(task.ceiling, 4), "updates_accepted": row["updates"],
               "load": round(os.getloadavg()[0], 1), "bytes_per_update": row["breakdown"]["bytes_per_update"],
               "model_per_update": row["breakdown"]["kinds"].get("down PUBLISH model"),
               "agents": device_rows(probes, task.pads, pcap_bytes(capture, port)), "rejected_log": rejections(log)}
    print(json.dumps(out), flush=True)
    with a.out.open("a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
