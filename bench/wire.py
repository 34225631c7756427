"""Wire benchmark: bytes per update for each codec vs raw float64 parameters, and the final
accuracy after the same number of updates per codec.

Real agents (`edge_agent.Agent`, real codec and msgpack bytes) and the real coordinator
core exchange real payloads in one process, without a broker, so only the codec differs
between runs. Prints JSON.

    python bench/wire.py [--agents 20] [--updates 1000] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.staleness import parse_staleness  # noqa: E402
from coordinator.strategies import make_strategy  # noqa: E402
from protocol.messages import decode_update  # noqa: E402
from protocol.topics import Topics  # noqa: E402
from simulation.datasets import centralized_baseline, load_dataset  # noqa: E402
from simulation.inprocess import drive, make_agents, make_core  # noqa: E402

CODECS = ["float32", "int8", "int4", "topk:0.1+int8", "topk:0.05+int4", "topk:0.02+int4"]


def run(codec: str, *, agents: int, updates: int, seed: int, publish_every: int) -> dict:
    """Federated training where agents always train from the newest published model."""
    ds = load_dataset("digits", seed=seed)
    topics = Topics("wire")
    core = make_core(ds, topics, make_strategy("fedasync", alpha=0.6, staleness=parse_staleness("polynomial:0.5")))
    fleet = make_agents(ds, topics, agents, "dirichlet:0.5", codec, seed=seed)
    sizes, payload_sizes = [], []
    for step in drive(core, fleet, updates=updates, seed=seed, publish_every=publish_every):
        if step.reason is not None:
            raise RuntimeError(f"an honest update was rejected: {step.reason}")
        sizes.append(len(step.payload))
        delta = decode_update(step.payload).delta
        payload_sizes.append(len(delta.data) + len(delta.index or b""))
    return {"bytes": float(np.mean(sizes)), "accuracy": core.scores_["accuracy"], "n_params": core.spec.n_params,
            "payload_bytes": float(np.mean(payload_sizes))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--updates", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--publish-every", type=int, default=10, help="updates between model publishes (coalescing)")
    args = p.parse_args()
    results = {}
    for codec in CODECS:
        runs = [run(codec, agents=args.agents, updates=args.updates, seed=s, publish_every=args.publish_every)
                for s in range(args.seeds)]
        n = runs[0]["n_params"]
        results[codec] = {
            "bytes_per_update": round(float(np.mean([r["bytes"] for r in runs])), 1),
            "encoded_delta_bytes": round(float(np.mean([r["payload_bytes"] for r in runs])), 1),
            "ratio_message_vs_float64_params": round(8 * n / np.mean([r["bytes"] for r in runs]), 2),
            "ratio_delta_vs_float64_params": round(8 * n / np.mean([r["payload_bytes"] for r in runs]), 2),
            "accuracy": round(float(np.mean([r["accuracy"] for r in runs])), 4),
            "accuracy_per_seed": [round(r["accuracy"], 4) for r in runs],
        }
    n = runs[0]["n_params"]
    ref = results["float32"]["accuracy"]
    for r in results.values():
        r["accuracy_loss_points_vs_float32"] = round(100 * (ref - r["accuracy"]), 2)
    print(json.dumps({
        "benchmark": "wire", "dataset": "digits", "partition": "dirichlet:0.5", "agents": args.agents,
        "updates": args.updates, "seeds": args.seeds, "n_params": n, "float64_param_bytes": 8 * n,
        "centralized_accuracy": round(float(np.mean([centralized_baseline(load_dataset("digits", seed=s), seed=s) for s in range(args.seeds)])), 4),
        "codecs": results,
    }, indent=1))


if __name__ == "__main__":
    main()
