#!/usr/bin/env python3
"""Write the docker-compose demo's data: deploy/data/agent-N.csv (one non-IID digits
partition per agent) and deploy/data/eval.csv (the held-out split for the coordinator).

    python deploy/make_demo_data.py [--agents 3] [--scheme dirichlet:0.5] [--seed 0] [--out deploy/data]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing fedmq too

from protocol.tabular import write_csv  # noqa: E402
from simulation.datasets import load_dataset  # noqa: E402
from simulation.partition import partition  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=3, help="number of partitions, agent-1..agent-N (default: 3)")
    p.add_argument("--scheme", default="dirichlet:0.5", help="partition scheme: iid, dirichlet:ALPHA, ... (default: dirichlet:0.5)")
    p.add_argument("--seed", type=int, default=0, help="partition seed (default: 0)")
    p.add_argument("--out", default=str(ROOT / "deploy" / "data"), help="output directory (default: deploy/data)")
    args = p.parse_args(argv)
    out = Path(args.out)
    ds = load_dataset("digits")
    for i, rows in enumerate(partition(ds.y_train, args.agents, args.scheme, seed=args.seed), start=1):
        write_csv(out / f"agent-{i}.csv", ds.X_train[rows], ds.y_train[rows])
        print(f"{out / f'agent-{i}.csv'}: {len(rows)} rows")
    write_csv(out / "eval.csv", ds.X_test, ds.y_test)
    print(f"{out / 'eval.csv'}: {len(ds.y_test)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
