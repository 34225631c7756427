"""Downlink model codec benchmark: final test accuracy with the model sent as float32, float16,
int8 or int4 (fedmq-coordinator --model-codec), real agents and the real coordinator core in one
process (simulation.inprocess), the same seeds for every codec; plus the model's bytes and the
accuracy of the final model as devices decode it (the quantized values).

Each run: a Dirichlet(0.5) partition over --agents agents, fedasync, --updates updates, the
model republished every 5 updates (the bytes agents train on are exactly what travels).
The seed-to-seed spread of float32 is the noise an int8 difference is judged against.

Prints and writes bench/results/model_codec.json; docs/benchmarks.md quotes it.

    python bench/model_codec.py [--seeds 5] [--agents 10] [--updates 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.evaluation import score  # noqa: E402
from coordinator.strategies import make_strategy  # noqa: E402
from protocol.topics import Topics  # noqa: E402
from simulation.datasets import load_dataset  # noqa: E402
from simulation.inprocess import drive, make_agents, make_core  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "model_codec.json"
CODECS = ("float32", "float16", "int8", "int4")
TOPICS = Topics("bench-codec")


def run(name: str, codec: str, seed: int, args: argparse.Namespace) -> dict:
    """One fleet, one codec, one seed: final accuracy and the model's size on the wire."""
    ds = load_dataset(name, seed=seed)
    core = make_core(ds, TOPICS, make_strategy("fedasync", alpha=0.3))
    core.model_codec = codec
    fleet = make_agents(ds, TOPICS, args.agents, "dirichlet:0.5", "int8", seed=seed)
    for _ in drive(core, fleet, updates=args.updates, seed=seed, publish_every=5):
        pass
    payload = core.model_payload()
    # what a device holds: the final model as it decodes it (quantized), scored on the same test rows
    device = score(core.spec, core.published_[core.version_].astype(np.float64), ds.X_test, ds.y_test)
    return {"seed": seed, "accuracy": round(core.scores_["accuracy"], 4),
            "device_accuracy": round(device["accuracy"], 4), "model_bytes": len(payload)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--updates", type=int, default=300)
    p.add_argument("--datasets", default="digits,wine,breast_cancer")
    args = p.parse_args()
    results = {}
    for name in args.datasets.split(","):
        rows = {}
        for codec in CODECS:
            runs = [run(name, codec, seed, args) for seed in range(args.seeds)]
            acc = [r["accuracy"] for r in runs]
            dev = [r["device_accuracy"] for r in runs]
            rows[codec] = {"mean_accuracy": round(statistics.mean(acc), 4), "stdev_accuracy": round(statistics.stdev(acc), 4),
                           "mean_device_accuracy": round(statistics.mean(dev), 4),
                           "model_bytes": runs[0]["model_bytes"], "runs": runs}
            print(json.dumps({name: {codec: rows[codec]["mean_accuracy"]}}), file=sys.stderr)
        base = rows["float32"]
        for codec in CODECS[1:]:
            diffs = [b["accuracy"] - a["accuracy"] for a, b in zip(base["runs"], rows[codec]["runs"])]
            rows[codec]["mean_diff_vs_float32"] = round(float(np.mean(diffs)), 4)
            rows[codec]["max_abs_diff_vs_float32"] = round(float(np.max(np.abs(diffs))), 4)
        results[name] = rows
    out = {"benchmark": "model_codec", "strategy": "fedasync alpha 0.3", "partition": "dirichlet:0.5",
           "agents": args.agents, "updates": args.updates, "seeds": args.seeds, "update_codec": "int8",
           "command": "python bench/model_codec.py " + " ".join(sys.argv[1:]), "results": results}
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
