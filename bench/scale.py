"""Scale benchmark: how many virtual agents stay connected and train at once on this
machine, and the memory each costs. Real agents, real MQTT clients, one mosquitto.

    python bench/scale.py [--agents 1000] [--duration 60]

Prints JSON: agents connected at peak, updates accepted, per-agent memory (process RSS
growth from building and connecting the agents, divided by their number).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.transport import BrokerSettings  # noqa: E402
from simulation.datasets import make_linear  # noqa: E402
from simulation.fleet import SimConfig, Simulation  # noqa: E402
from simulation.mosquitto import Mosquitto  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--rows-per-agent", type=int, default=20)
    args = p.parse_args()
    me = psutil.Process()
    dataset = make_linear(n_samples=int(args.rows_per_agent * args.agents / 0.75) + 10, n_features=10)
    rss_before = me.memory_info().rss
    peak = {"connected": 0, "rss": rss_before}
    config = SimConfig(agents=args.agents, partition="iid", strategy="fedbuff", buffer_size=50,
                       duration=args.duration, round_time=0.0, publish_interval=1.0, fleet="scale",
                       hyperparameters={"eta0": 0.01})

    def watch(sim: Simulation) -> None:
        peak["connected"] = max(peak["connected"], sim.traffic.connected)
        peak["rss"] = max(peak["rss"], me.memory_info().rss)
        if sim.traffic.connected >= args.agents and "all_connected_s" not in peak:
            peak["all_connected_s"] = round(time.monotonic() - sim.started_at, 2)

    with tempfile.TemporaryDirectory() as tmp:
        conf = "max_connections -1\n"
        with Mosquitto(Path(tmp), extra_conf=conf) as broker:
            sim = Simulation(config, dataset, BrokerSettings.from_url(broker.url))
            result = sim.run(progress=watch)
            broker_rss = psutil.Process(broker.proc.pid).memory_info().rss
    print(json.dumps({
        "benchmark": "scale", "agents": args.agents, "duration_s": args.duration,
        "threads_in_process": threading.active_count(),
        "peak_connected": peak["connected"], "all_connected_after_s": peak.get("all_connected_s"),
        "updates_sent": result["updates_sent"], "accepted": result["accepted"], "versions": result["version"],
        "updates_per_s": round(result["accepted"] / result["wall_time_s"], 1),
        "final_r2": result["final_score"],
        "process_rss_before_mb": round(rss_before / 2**20, 1), "process_rss_peak_mb": round(peak["rss"] / 2**20, 1),
        "memory_per_agent_kb": round((peak["rss"] - rss_before) / args.agents / 1024, 1),
        "mosquitto_rss_mb": round(broker_rss / 2**20, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
