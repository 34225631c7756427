"""Privacy benchmark: final test accuracy (digits) and r2 (linear) at epsilon 1, 3, 8 and without DP,
for local DP (agents clip and noise) and central DP (the coordinator clips and noises each buffer's sum).

Real agents and the real coordinator core exchange real payloads in one process
(simulation.inprocess): 20 agents, fedbuff with K = 10, equal weights under DP, int8
updates. Each DP run calibrates sigma with the RDP accountant so that 20 contributions
per agent reach the target epsilon at delta = 1e-5; agents (local) or the coordinator
(central) then enforce that budget, and the run reports the epsilon the accountant gave
for the worst-off agent. Medians over the seeds, with their min and max. Noise is drawn from OS entropy, so two
runs of the same seed differ by the noise (as they must).

    python bench/privacy.py [--seeds 5] [--updates 400] [--out bench/results/privacy.json]

Prints JSON and writes it to --out; docs/benchmarks.md and docs/security.md quote it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.privacy import CentralDP, PrivateCoordinator, guard  # noqa: E402
from coordinator.strategies import FedBuff  # noqa: E402
from coordinator.validation import UpdateValidator  # noqa: E402
from edge_agent.agent import Agent  # noqa: E402
from edge_agent.data import ArraySource  # noqa: E402
from edge_agent.trainer import LocalTrainer  # noqa: E402
from protocol import accounting  # noqa: E402
from protocol.model_spec import ModelSpec  # noqa: E402
from protocol.privacy import GaussianMechanism  # noqa: E402
from protocol.topics import Topics  # noqa: E402
from simulation.datasets import load_dataset  # noqa: E402
from simulation.inprocess import drive, make_agents, make_core  # noqa: E402
from simulation.partition import partition  # noqa: E402

EPSILONS = (1.0, 3.0, 8.0)
DELTA = 1e-5
# dataset -> (partition, clipping norm C, metric). C is about the 10th percentile of the
# no-DP update norms (digits: 480 of median 750; linear: median 0.017, first rounds 0.3),
# chosen once from a no-DP run, as an operator would tune it on public or proxy data.
DATASETS = {
    "digits": ("dirichlet:0.5", 100.0, "accuracy"),
    "linear": ("dirichlet:0.5", 0.1, "r2"),
}


def run_once(name: str, mode: str, epsilon: float | None, seed: int, args: argparse.Namespace,
             buffer_size: int | None = None) -> dict:
    """One fleet, one seed: the final score and the privacy account the run ended with."""
    scheme, clip_norm, metric = DATASETS[name]
    k = buffer_size or args.buffer_size
    ds = load_dataset(name, seed=seed)
    topics = Topics(f"privacy-{seed}")
    inner = FedBuff(k, server_lr=args.server_lr)
    sigma = None if epsilon is None else accounting.calibrate_noise(epsilon, args.contributions, DELTA)
    started = time.perf_counter()
    if mode == "central":
        dp = CentralDP(inner, GaussianMechanism(clip_norm, sigma), DELTA, epsilon_budget=epsilon, norm_action="clip")
        spec = ModelSpec(ds.model, ds.n_features, ds.classes)
        core = PrivateCoordinator(topics, spec, dp, guard(UpdateValidator(topics, spec.n_params), dp),
                                  eval_data=(ds.X_test, ds.y_test), privacy=dp)
        agents = make_agents(ds, topics, args.agents, scheme, args.codec, seed=seed)
    else:
        core = make_core(ds, topics, inner)
        if mode == "local":
            mech = GaussianMechanism(clip_norm, sigma)
            parts = partition(ds.y_train, args.agents, scheme, seed=seed)
            agents = [Agent(f"a{i}", topics, ArraySource(ds.X_train[p], ds.y_train[p]), LocalTrainer(random_state=seed + i),
                            args.codec, seed=seed + i, dp=mech, dp_delta=DELTA, dp_epsilon_budget=epsilon)
                      for i, p in enumerate(parts)]
        else:
            agents = make_agents(ds, topics, args.agents, scheme, args.codec, seed=seed)
    for _ in drive(core, agents, updates=args.updates, seed=seed, publish_every=k):
        pass
    result = {"seed": seed, metric: round(core.scores_[metric], 4), "accepted": core.accepted_,
              "rejected": dict(core.rejected_), "versions": core.version_,
              "seconds": round(time.perf_counter() - started, 2)}
    if mode == "central":
        report = dp.report()
        result.update(epsilon=report["epsilon"], epsilon_median=report["epsilon_median"],
                      contributions_max=report["contributions_max"], releases=report["releases"])
    elif mode == "local":
        eps = [a.dp_budget.epsilon for a in agents]
        result.update(epsilon=max(eps), epsilon_median=statistics.median(eps),
                      contributions_max=max(a.dp_budget.contributions for a in agents))
    return result


def summarise(runs: list[dict], metric: str, epsilon: float | None, sigma: float | None, clip_norm: float,
              k: int) -> dict:
    """Medians over the seeds and their spread (min, max), with the exact (epsilon, delta) the accountant gave."""
    scores = [r[metric] for r in runs]
    out = {"target_epsilon": epsilon, f"median_{metric}": round(statistics.median(scores), 4),
           f"min_{metric}": round(min(scores), 4), f"max_{metric}": round(max(scores), 4)}
    if epsilon is not None:
        out.update(epsilon=max(r["epsilon"] for r in runs), delta=DELTA, noise_multiplier=round(sigma, 4),
                   clip=clip_norm, noise_std_on_sum=round(sigma * clip_norm, 6))
        out["noise_std_per_coordinate_of_step"] = round(sigma * clip_norm / (k if "releases" in runs[0] else np.sqrt(k)), 6)
        # the same releases under the replace-one relation (sensitivity 2C, issue 19.6): what a device whose
        # participation is public gets; the fedmq-agent CLI's default
        out["epsilon_replace_one"] = max(accounting.epsilon(sigma, r["contributions_max"], DELTA, "replace-one") for r in runs)
    out["runs"] = runs
    return out


def noise_table(contributions: int) -> dict:
    """Noise std per coordinate of the averaged step, per unit of C, at the same epsilon: central sigma/K, local sigma/sqrt(K)."""
    table = {}
    for eps in EPSILONS:
        sigma = accounting.calibrate_noise(eps, contributions, DELTA)
        table[f"epsilon_{eps:g}"] = {
            "noise_multiplier": round(sigma, 4),
            "epsilon": accounting.epsilon(sigma, contributions, DELTA),
            **{f"K={k}": {"central": round(sigma / k, 5), "local": round(sigma / np.sqrt(k), 5)}
               for k in (1, 10, 100, 1000, 10000)},
        }
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--updates", type=int, default=400, help="updates the schedule asks for (20 per agent on average)")
    p.add_argument("--contributions", type=int, default=20, help="contributions per agent the budget is calibrated for")
    p.add_argument("--buffer-size", type=int, default=10)
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--codec", default="int8")
    p.add_argument("--seeds", type=int, default=5, help="seeds per cell: the median is reported with min and max")
    p.add_argument("--datasets", default="digits,linear")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "privacy.json"))
    args = p.parse_args()
    started = time.perf_counter()
    results: dict = {"config": {k: v for k, v in vars(args).items() if k != "out"} | {"delta": DELTA, "strategy": "fedbuff",
                                                                                  "accountant": "dp_accounting.rdp.RdpAccountant"}}
    for name in args.datasets.split(","):
        scheme, clip_norm, metric = DATASETS[name]
        cells: dict = {"partition": scheme, "clip": clip_norm, "metric": metric}
        no_dp = [run_once(name, "none", None, seed, args) for seed in range(args.seeds)]
        cells["no_dp"] = summarise(no_dp, metric, None, None, clip_norm, args.buffer_size)
        print(json.dumps({name: {"no_dp": cells["no_dp"][f"median_{metric}"]}}), file=sys.stderr)
        for mode in ("local", "central"):
            cells[mode] = {}
            for eps in EPSILONS:
                sigma = accounting.calibrate_noise(eps, args.contributions, DELTA)
                runs = [run_once(name, mode, eps, seed, args) for seed in range(args.seeds)]
                cells[mode][f"epsilon_{eps:g}"] = summarise(runs, metric, eps, sigma, clip_norm, args.buffer_size)
                print(json.dumps({name: {mode: {eps: cells[mode][f"epsilon_{eps:g}"][f"median_{metric}"]}}}), file=sys.stderr)
        results[name] = cells
    # the 1/K effect measured: central DP at epsilon 3 on linear with larger buffers (same epsilon per agent)
    if "linear" in args.datasets.split(","):
        _, clip_norm, metric = DATASETS["linear"]
        sigma = accounting.calibrate_noise(3.0, args.contributions, DELTA)
        sweep = {}
        for k in (5, 10, 20):
            runs = [run_once("linear", "central", 3.0, seed, args, buffer_size=k) for seed in range(args.seeds)]
            sweep[f"K={k}"] = summarise(runs, metric, 3.0, sigma, clip_norm, k)
        results["central_buffer_sweep_linear_epsilon_3"] = sweep
    results["noise_per_coordinate_per_unit_C"] = noise_table(args.contributions)
    results["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(results, indent=1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
