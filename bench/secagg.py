"""Secure aggregation costs (issue 15): per-agent bytes and CPU per round and round latency for
K = 5, 10, 20, 50; drop-out tolerance (K = 10, t = 6); accuracy against plain fedbuff on the float
deltas (no clip, no quantization), with the adaptive clip and with the clip fixed at 10. In one process (simulation/secagg.py: the exact payloads MQTT would carry, no broker).
Writes bench/results/secagg.json (its other entries, from the modes below and bench/secagg_mqtt.py,
are kept).

    python -m bench.secagg                                        # this machine
    cp -ax "$(scripts/pi-root path)" /tmp/pi-root-secagg          # a copy of the root (see below)
    python -m bench.secagg --pi-root /tmp/pi-root-secagg          # per-agent CPU for K = 5, 10, 20 in the
                                                                  # emulated aarch64 root (qemu-user, cortex-a72)

In the root, `cryptography` (an optional dependency, not in the venv scripts/pi-root build makes) is
pip-installed into its venv if missing, and this checkout is installed into it (scripts/pi-root install).
Use a copy: the shared root stays without `cryptography`, so tests/test_pi.py keeps checking that the
agent starts without it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

import numpy as np

from coordinator.evaluation import score
from coordinator.secagg import SecAggRounds
from edge_agent.secagg import SecAggClient
from edge_agent.trainer import LocalTrainer
from protocol import secagg as sa
from protocol.messages import ModelMessage
from protocol.model_spec import ModelSpec
from protocol.topics import Topics
from simulation.datasets import load_dataset
from simulation.partition import partition
from simulation.secagg import run_round

TOPICS = Topics("bench")
N_PARAMS = 650  # the digits model (64 features x 10 classes + 10)
OUT = Path(__file__).resolve().parent / "results" / "secagg.json"


def costs(k: int, rounds_n: int = 3) -> dict:
    """Median per-agent bytes sent/received, CPU ms, coordinator CPU ms and round latency over `rounds_n` rounds."""
    rounds = SecAggRounds(TOPICS, N_PARAMS, k, k // 2 + 1, clip=10.0)
    clients = {f"a{i:02d}": SecAggClient(f"a{i:02d}", TOPICS) for i in range(k)}
    rng = np.random.default_rng(k)
    rows = []
    for _ in range(rounds_n):
        result, c = run_round(rounds, clients, {a: rng.normal(0, 0.1, N_PARAMS) for a in clients})
        assert result is not None and result.count == k
        rows.append((statistics.median(c.sent.values()), statistics.median(c.received.values()),
                     statistics.median(c.cpu.values()) * 1e3, c.coordinator_cpu * 1e3, c.wall * 1e3))
    med = [statistics.median(col) for col in zip(*rows)]
    return {"k": k, "threshold": k // 2 + 1, "n_params": N_PARAMS, "agent_bytes_sent": int(med[0]),
            "agent_bytes_received": int(med[1]), "agent_cpu_ms": round(med[2], 2),
            "coordinator_cpu_ms": round(med[3], 1), "round_ms": round(med[4], 1),
            "plain_update_bytes": 4 * N_PARAMS}


def dropouts() -> list[dict]:
    """K = 10, t = 6: 0-4 agents vanish after sending their shares (before their masked input), or after masking."""
    out = []
    for when in ("masked", "reveal"):
        for gone in range(5):
            rounds = SecAggRounds(TOPICS, N_PARAMS, 10, 6, clip=10.0)
            clients = {f"a{i:02d}": SecAggClient(f"a{i:02d}", TOPICS) for i in range(10)}
            rng = np.random.default_rng(gone)
            deltas = {a: rng.normal(0, 0.1, N_PARAMS) for a in clients}
            drop = {f"a{i:02d}": when for i in range(gone)}
            result, _ = run_round(rounds, clients, deltas, drop=drop)
            included = [a for a in deltas if not (a in drop and when == "masked")]
            exact = sum(np.rint(np.clip(deltas[a], -10, 10) * rounds.scale).astype(np.int64) for a in included) / rounds.scale
            out.append({"vanish_before": when, "vanished": gone, "completed": result is not None,
                        "summed": result.count if result else 0,
                        "exact": bool(result is not None and np.array_equal(result.total, exact))})
    return out


def _fleet(seed: int, agents: int):
    ds = load_dataset("digits", seed=seed)
    spec = ModelSpec("sgd-classifier", ds.n_features, ds.classes)
    return ds, spec, partition(ds.y_train, agents, "dirichlet:0.5", seed=seed)


def accuracy_once(mode: str, seed: int, k: int = 5, agents: int = 20, steps: int = 40) -> dict:
    """Digits, Dirichlet 0.5, fedbuff steps over cohorts of `k`: `plain` sums the float deltas in the
    clear (no clip, no quantization); `secure` through masked rounds with the adaptive clip (from 10,
    target 1% of coordinates clipped, as the CLI defaults); `secure_fixed_10` with the clip fixed at 10."""
    ds, spec, parts = _fleet(seed, agents)
    rng = np.random.default_rng(seed)
    trainers = [LocalTrainer(random_state=seed + i) for i in range(agents)]
    rounds = SecAggRounds(TOPICS, spec.n_params, k, k // 2 + 1, clip=10.0,
                          clip_target=0.01 if mode == "secure" else None)
    clients = {f"a{i:02d}": SecAggClient(f"a{i:02d}", TOPICS) for i in range(agents)}
    params = np.zeros(spec.n_params)
    clipped = []
    for step in range(steps):
        model = ModelMessage("bench", step, spec, params.astype(np.float32))
        chosen = rng.choice(agents, k, replace=False)
        deltas = {f"a{i:02d}": trainers[i].train(model, ds.X_train[parts[i]], ds.y_train[parts[i]]).delta for i in chosen}
        if mode == "plain":
            total, count = sum(deltas.values()), len(deltas)
        else:
            clipped.append(sum(sa.clipped_count(d, rounds.clip) for d in deltas.values()) / (k * spec.n_params))
            for a in clients:  # a fresh round for the chosen: the others hold nothing
                clients[a]._keys = None
            rounds.keys.clear()
            result, _ = run_round(rounds, {a: clients[a] for a in deltas}, deltas, version=step)
            total, count = result.total, result.count
        params = params + total / count
    out = {"seed": seed, "accuracy": round(score(spec, params, ds.X_test, ds.y_test)["accuracy"], 4)}
    if clipped:
        out.update(first_round_clipped=round(clipped[0], 4), median_clipped=round(statistics.median(clipped), 4),
                   final_clip=round(rounds.clip, 2))
    return out


def accuracy(seeds: int = 5, k: int = 5, agents: int = 20, steps: int = 40) -> dict:
    """`accuracy_once` per mode over `seeds` seeds: medians with min and max."""
    out = {"k": k, "agents": agents, "steps": steps, "seeds": seeds, "dataset": "digits", "partition": "dirichlet:0.5",
           "clip_target": 0.01, "initial_clip": 10.0}
    for mode in ("plain", "secure", "secure_fixed_10"):
        runs = [accuracy_once(mode, seed, k, agents, steps) for seed in range(seeds)]
        acc = [r["accuracy"] for r in runs]
        cell = {"median": round(statistics.median(acc), 4), "min": min(acc), "max": max(acc), "runs": runs}
        if mode != "plain":
            cell["median_first_round_clipped"] = round(statistics.median(r["first_round_clipped"] for r in runs), 4)
            cell["median_clipped"] = round(statistics.median(r["median_clipped"] for r in runs), 4)
        out[mode] = cell
    return out


def machine() -> str:
    return f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}"


def write(update: dict) -> dict:
    """Merge `update` into bench/results/secagg.json (the other modes' entries stay)."""
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    result.update(update)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    return result


def pi_costs(root: str, ks: list[int]) -> dict:
    """`costs(k)` run by the emulated aarch64 root's Python (this checkout installed into it first)."""
    env = {**os.environ, "FEDMQ_PI_ROOT": root}
    script = str(Path(__file__).resolve().parent.parent / "scripts" / "pi-root")
    if subprocess.run([script, "run", "/opt/venv/bin/python", "-c", "import cryptography"], env=env,
                      capture_output=True).returncode != 0:
        subprocess.run([script, "run", "/opt/venv/bin/pip", "install", "-q", "cryptography>=41"], check=True, env=env)
    subprocess.run([script, "install"], check=True, capture_output=True, env=env)
    out = subprocess.run(["chroot", root, "/bin/sh", "-c", "cd /opt/fedmq-src && exec /opt/venv/bin/python -m bench.secagg "
                          f"--costs-only {','.join(map(str, ks))}"], check=True, capture_output=True, text=True,
                         env={**env, "QEMU_CPU": os.environ.get("QEMU_CPU", "cortex-a72")})
    return json.loads(out.stdout)


def main() -> None:
    """Run everything (or one mode), print and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pi-root", help="measure per-agent costs in this emulated aarch64 root (scripts/pi-root path)")
    p.add_argument("--costs-only", help=argparse.SUPPRESS)  # K,K,...: print costs as JSON (run inside the root)
    args = p.parse_args()
    if args.costs_only:
        print(json.dumps({"machine": machine(), "costs": [costs(int(k)) for k in args.costs_only.split(",")]}))
        return
    if args.pi_root:
        got = pi_costs(args.pi_root, [5, 10, 20])
        update = {"aarch64_emulated": {
            "machine": got["machine"], "target": "emulated aarch64 (qemu-user, QEMU_CPU cortex-a72) on this x86_64 machine",
            "method": "in-process (simulation/secagg.py) in the emulated root; CPU is process time under qemu, "
                      "median of 3 rounds", "costs": got["costs"]}}
    else:
        update = {"machine": machine(),
                  "method": "in-process (simulation/secagg.py), exact MQTT payloads, no broker; median of 3 rounds",
                  "costs": [costs(k) for k in (5, 10, 20, 50)], "dropouts": dropouts(), "accuracy": accuracy()}
    print(json.dumps(update, indent=1))
    write(update)


if __name__ == "__main__":
    main()
