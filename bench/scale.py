"""Scale benchmark: how many virtual agents stay connected and train at once on this
machine, and the memory each costs. Real agents, real MQTT clients, one mosquitto.

    python bench/scale.py [--agents 1000,5000] [--duration 60] [--out bench/results/scale.json]
    python bench/scale.py --target-updates-per-s 100 --paced-only --out bench/results/scale.json

--target-updates-per-s also runs every fleet size with pace steering (the coordinator asks each
agent to report once per agents / RATE seconds, protocol/pace.py) as `paced`; --paced-only runs
only those and keeps the other sections of an existing --out file (--section names theirs).

Prints JSON per fleet size: agents connected at peak, updates accepted, final r2 beside the
staleness of the accepted updates (mean, max), per-agent memory (process RSS growth from
building and connecting the agents, divided by their number).
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

# Updates staler than this many versions are refused before their delta is decoded. A fleet
# that offers more updates than the coordinator takes builds a backlog whose staleness grows
# without bound; fedbuff's polynomial:0.5 weight then lets stale deltas pile up into a divergent
# step (docs/benchmarks.md section 4). 20 versions: about four publishes at this rate.
MAX_STALENESS = 20


def run(agents: int, duration: float, rows_per_agent: int, max_staleness: int, target: float = 0.0,
        pace_min_interval: float = 1.0) -> dict:
    """One fleet of `agents` for `duration` seconds; its figures, staleness beside r2."""
    me = psutil.Process()
    dataset = make_linear(n_samples=int(rows_per_agent * agents / 0.75) + 10, n_features=10)
    rss_before = me.memory_info().rss
    peak = {"connected": 0, "rss": rss_before}
    config = SimConfig(agents=agents, partition="iid", strategy="fedbuff", buffer_size=50,
                       duration=duration, round_time=0.0, publish_interval=1.0, fleet="scale",
                       hyperparameters={"eta0": 0.01}, max_staleness=max_staleness,
                       target_updates_per_s=target, pace_min_interval=pace_min_interval)

    def watch(sim: Simulation) -> None:
        peak["connected"] = max(peak["connected"], sim.traffic.connected)
        peak["rss"] = max(peak["rss"], me.memory_info().rss)
        if sim.traffic.connected >= agents and "all_connected_s" not in peak:
            peak["all_connected_s"] = round(time.monotonic() - sim.started_at, 2)

    with tempfile.TemporaryDirectory() as tmp:
        conf = "max_connections -1\n"
        with Mosquitto(Path(tmp), extra_conf=conf) as broker:
            sim = Simulation(config, dataset, BrokerSettings.from_url(broker.url))
            result = sim.run(progress=watch)
            broker_rss = psutil.Process(broker.proc.pid).memory_info().rss
    return {
        "agents": agents, "duration_s": duration, "max_staleness": max_staleness, "target_updates_per_s": target,
        "pace": result["pace"], "pace_min_interval": pace_min_interval,
        "threads_in_process": threading.active_count(),
        "peak_connected": peak["connected"], "all_connected_after_s": peak.get("all_connected_s"),
        "updates_sent": result["updates_sent"], "accepted": result["accepted"], "rejected": result["rejected"],
        "versions": result["version"],
        "updates_per_s": round(result["accepted"] / result["wall_time_s"], 1),
        "final_r2": result["final_score"],
        "staleness_mean": round(result["staleness"]["mean"], 1), "staleness_max": result["staleness"]["max"],
        "process_rss_before_mb": round(rss_before / 2**20, 1), "process_rss_peak_mb": round(peak["rss"] / 2**20, 1),
        "memory_per_agent_kb": round((peak["rss"] - rss_before) / agents / 1024, 1),
        "mosquitto_rss_mb": round(broker_rss / 2**20, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", default="1000,5000", help="fleet sizes, comma-separated, one run each")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--rows-per-agent", type=int, default=20)
    p.add_argument("--max-staleness", type=int, default=MAX_STALENESS,
                   help="the coordinator's --max-staleness (versions) for every run")
    p.add_argument("--before", type=int, metavar="MAX_STALENESS",
                   help="also run the largest fleet with this --max-staleness (the old default: 1000), as `before`")
    p.add_argument("--target-updates-per-s", type=float, default=0.0, metavar="RATE",
                   help="also run every fleet size with pace steering at RATE updates/s, as `paced`")
    p.add_argument("--pace-min-interval", default="1", metavar="SECONDS|fleet",
                   help="the coordinator's --pace-min-interval in the paced runs (what its first model asks, before "
                   "any agent is counted); fleet: the fleet's own interval, agents / RATE")
    p.add_argument("--section", default="paced", help="the results key of the paced runs")
    p.add_argument("--paced-only", action="store_true",
                   help="run only the paced fleets; the other sections of an existing --out file are kept")
    p.add_argument("--out", type=Path, help="also write the JSON here (bench/results/scale.json)")
    args = p.parse_args()
    sizes = [int(n) for n in args.agents.split(",")]
    if args.paced_only and not args.target_updates_per_s:
        p.error("--paced-only needs --target-updates-per-s")
    if args.paced_only:
        result = json.loads(args.out.read_text()) if args.out and args.out.exists() else {"benchmark": "scale"}
    else:
        runs = [run(n, args.duration, args.rows_per_agent, args.max_staleness) for n in sizes]
        result = {"benchmark": "scale", **runs[0], "runs": runs}
        if args.before is not None:
            result["before"] = run(max(sizes), args.duration, args.rows_per_agent, args.before)
    if args.target_updates_per_s:
        def floor(n: int) -> float:
            return n / args.target_updates_per_s if args.pace_min_interval == "fleet" else float(args.pace_min_interval)
        result[args.section] = [run(n, args.duration, args.rows_per_agent, args.max_staleness, args.target_updates_per_s,
                                    floor(n)) for n in sizes]
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
