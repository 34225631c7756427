"""Schema from the fleet: raw-unit CSVs with reordered columns and gaps, a coordinator given only --model.

Issue 12's "done when", in one process with the real pieces: each of 5 agents reads its own
CSV file (edge_agent.data.CSVFile) holding its shard in raw units (as bench/raw_data.py
makes them: wine and breast_cancer as bundled, digits with per-feature gains spanning 1e-3
to 1e3) with its columns in an order of its own (agent 0 in the file's natural order, the
others shuffled) and 5% of the feature cells left empty. The spec is fixed from the
agents' schema announcements (coordinator.schema.SchemaDiscovery, --schema-agents 5: no
--n-features, no --classes), the statistics are merged by column name, the held-out split
is scored in the fleet's column order, and fedasync trains 20 x 5 scheduled updates.
Compared with the centralized ceiling of bench/raw_data.py (the same SGD model, 20 epochs
on the pooled train split standardized with its own statistics, no gaps). Target: within
2 points.

Prints and writes bench/results/schema_fleet.json; docs/benchmarks.md quotes it.

    python bench/schema_fleet.py [--seeds 5] [--agents 5] [--epochs 20]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from coordinator.schema import GRACE_S, FleetSchema, SchemaDiscovery  # noqa: E402
from coordinator.server import Coordinator  # noqa: E402
from coordinator.statistics import FleetStatistics  # noqa: E402
from coordinator.strategies import make_strategy  # noqa: E402
from coordinator.validation import UpdateValidator  # noqa: E402
from edge_agent.agent import Agent  # noqa: E402
from edge_agent.data import CSVFile  # noqa: E402
from edge_agent.trainer import LocalTrainer  # noqa: E402
from protocol.schema import column_order  # noqa: E402
from protocol.topics import Topics  # noqa: E402
from raw_data import raw_dataset, standardized  # noqa: E402
from report import seed_cell, write_results  # noqa: E402
from simulation.datasets import Dataset, centralized_baseline  # noqa: E402
from simulation.inprocess import drive  # noqa: E402
from simulation.partition import partition  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "schema_fleet.json"
TOPICS = Topics("bench-schema")
GAPS = 0.05


def write_shard(path: Path, X: np.ndarray, y: np.ndarray, names: list[str], order: list[int],
                rng: np.random.Generator) -> int:
    """The shard as a CSV with columns `order` of `names`, a GAPS share of cells empty; returns how many."""
    empty = 0
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow([names[j] for j in order] + ["label"])
        for xi, yi in zip(X, y):
            cells = []
            for j in order:
                gap = rng.random() < GAPS
                empty += gap
                cells.append("" if gap else repr(float(xi[j])))
            out.writerow(cells + [int(yi)])
    return empty


def schema_fleet(ds: Dataset, *, agents: int, epochs: int, seed: int, workdir: Path) -> dict:
    """Test accuracy of a fleet that learns its spec from its CSVs (reordered, with gaps)."""
    names = [f"{ds.name}_{j:02d}" for j in range(ds.n_features)]
    rng = np.random.default_rng(seed)
    fleet, empty = [], 0
    for i, idx in enumerate(partition(ds.y_train, agents, "iid", seed=seed)):
        order = list(range(ds.n_features)) if i == 0 else list(rng.permutation(ds.n_features))
        path = workdir / f"{ds.name}-{seed}-a{i}.csv"
        empty += write_shard(path, ds.X_train[idx], ds.y_train[idx], names, order, rng)
        source = CSVFile(path)
        source.poll()
        fleet.append(Agent(f"a{i}", TOPICS, source, LocalTrainer(random_state=seed + i), "float32", seed=seed + i))
    discovery = SchemaDiscovery(agents=agents)
    for agent in fleet:
        discovery.add(TOPICS, TOPICS.schema(agent.agent_id), agent.schema_payload())
    assert discovery.done(now=time.monotonic() + GRACE_S)  # as after the grace for the retained announcements
    spec = discovery.spec("sgd-classifier", {})
    order = column_order(names, spec)  # the held-out split in the fleet's order
    X_test = ds.X_test if order is None else ds.X_test[:, order]
    core = Coordinator(TOPICS, spec, make_strategy("fedasync", alpha=0.5), UpdateValidator(TOPICS, spec.n_params),
                       publish_interval=0, eval_data=(X_test, ds.y_test),
                       statistics=FleetStatistics(TOPICS, spec.n_features, columns=spec.columns),
                       schema=FleetSchema(TOPICS, spec))
    for agent in fleet:
        assert core.handle_schema(TOPICS.schema(agent.agent_id), encode(agent)) is None
        assert core.handle_statistics(TOPICS.stats(agent.agent_id), agent.statistics_payload()) is None
    assert core.ready and core.schema.summary()["mismatched"] == 0
    for _ in drive(core, fleet, updates=epochs * agents, seed=seed, publish_every=1):
        pass
    return {"accuracy": float(core.scores_["accuracy"]), "empty_cells": empty, "classes": list(spec.classes)}


def encode(agent: Agent) -> bytes:
    """The agent's announcement again (it sends one only when its schema changed)."""
    agent.schema_sent_ = None
    return agent.schema_payload()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--agents", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20)
    args = p.parse_args()
    results: dict = {"agents": args.agents, "epochs": args.epochs, "seeds": args.seeds, "gaps": GAPS, "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("wine", "breast_cancer", "digits"):
            ceiling, fleet = [], []
            for seed in range(args.seeds):
                ds = raw_dataset(name, seed)
                ceiling.append(centralized_baseline(standardized(ds), epochs=args.epochs, seed=seed))
                fleet.append(schema_fleet(ds, agents=args.agents, epochs=args.epochs, seed=seed, workdir=Path(tmp)))
            cell = {"ceiling": seed_cell(ceiling),
                    "schema_fleet": dict(seed_cell([f["accuracy"] for f in fleet]),
                                         empty_cells=[f["empty_cells"] for f in fleet])}
            cell["gap_points"] = round(100 * (cell["ceiling"]["accuracy"] - cell["schema_fleet"]["accuracy"]), 2)
            results["datasets"][name] = cell
            print(name, json.dumps(cell), flush=True)
    write_results(RESULTS, results)


if __name__ == "__main__":
    main()
