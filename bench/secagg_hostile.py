"""Secure-aggregation liveness with one hostile member (issue 18.7): rounds completed in the same
time by 10 members over a real mosquitto and the real coordinator process, all honest and with
one member (of 10) running each attack of simulation/secagg_mqtt.py (garbage shares, join and
leave, no masked input). Cohorts of K = 5 (t = 3), the defaults for --secagg-timeout (10 s),
--secagg-grace (2 s) and --secagg-backoff (30 s).

    python -m bench.secagg_hostile                  # 60 s per fleet
    python -m bench.secagg_hostile --seconds 30

Writes the `hostile` entry of bench/results/secagg.json (its other entries are kept).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.secagg import machine, write  # noqa: E402
from simulation.mosquitto import Mosquitto  # noqa: E402
from simulation.secagg_mqtt import ATTACKS, run_fleet  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="measurement window per fleet, from its first round")
    p.add_argument("--agents", type=int, default=10, help="members in the fleet (one of them hostile)")
    p.add_argument("--k", type=int, default=5, help="cohort size K")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="secagg-hostile-") as tmp:
        broker = Mosquitto(Path(tmp) / "broker")
        broker.start()
        try:
            for i, attack in enumerate((None, *ATTACKS)):
                out = run_fleet(broker.url, broker.host, broker.port, Path(tmp), fleet=f"hostile{i}",
                                n_agents=args.agents, k=args.k, attack=attack, seconds=args.seconds)
                row = {"attack": attack or "none", "completed": out["completed"],
                       "cohorts_with_attacker": sum("a00" in c for c in out["cohorts"]) if attack else None,
                       "excluded": out["status"].get("excluded", {}), "aborted": out["status"].get("aborted", {})}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
        finally:
            broker.stop()
    honest = rows[0]["completed"]
    for row in rows:
        row["vs_honest"] = round(row["completed"] / honest, 3)
    update = {"hostile": {
        "machine": machine(),
        "method": f"real mosquitto, the real coordinator process (fedbuff, --secure-aggregation, K = {args.k}, defaults "
                  f"for timeout, grace, back-off), {args.agents} members as paho clients in one process driving "
                  "edge_agent/secagg.py, a fresh random delta as soon as one is spent; rounds completed in "
                  f"{args.seconds:g} s from the first completed round",
        "seconds": args.seconds, "agents": args.agents, "k": args.k, "results": rows}}
    print(json.dumps(update, indent=1))
    write(update)


if __name__ == "__main__":
    main()
