"""fedmq settings on one seed of bench/async_advantage.py's task, without the Flower run: what moves
time to the ceiling and device bytes (issue 23, points 1 and 4).

Each NAME=FLAGS (coordinator flags, then --agents and the agents' flags, as async_advantage's --fedmq)
runs for --seconds from its first local round, one after another, on the same shards and device pads.
Appends one JSON line a run (figures as async_advantage.py, no timeline) to --out.

    python bench/async_advantage_sweep.py --seed 2 --seconds 70 "K10=--strategy fedbuff --buffer-size 10" ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import async_advantage as aa  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--seconds", type=float, default=70.0, help="each run's time from its first local round")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "async_advantage_sweep.jsonl")
    p.add_argument("config", nargs="+", metavar="NAME=FLAGS")
    a = p.parse_args()
    task_args = argparse.Namespace(dataset="many_classes", partition="shards:4", agents=10, round_time=0.5, sigma=1.0)
    with tempfile.TemporaryDirectory(prefix="async-sweep-") as tmp:
        task = aa.write_task(Path(tmp) / "task", task_args, a.seed)
        for spec in a.config:
            name, _, flags = spec.partition("=")
            probes, capture, port, timeline, end = aa.run_fedmq(Path(tmp) / name, task, flags.split(), a.seconds)
            row = aa.figures(name, probes, capture, port, timeline, task.ceiling, end)
            row.pop("timeline")
            row.update(flags=flags, seed=a.seed, ceiling=round(task.ceiling, 4), load_average=round(os.getloadavg()[0], 1))
            print(json.dumps(row), flush=True)
            with a.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
