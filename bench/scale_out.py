"""Scale-out tier benchmark: connections held, memory per connection, updates/s through the tier
with 1, 2 and 4 partition workers beside one coordinator on mosquitto in the same run, and
publish-to-fold latency (device send -> root fold, from the root's audit log). Prints JSON.

    python bench/scale_out.py [--connections 2000] [--updates 2000] [--workers 1,2,4] [--out FILE]

Everything is real: a 3-node nats-server 2.15 cluster (R3) on loopback, the root and the workers
as processes, devices from tier/loadgen.py (asyncio MQTT 3.1.1, pre-encoded int8 updates of
10,000 parameters). On a 2-core machine the brokers, the tier and the generator share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocol import codec  # noqa: E402
from protocol.messages import UpdateMessage, encode_update  # noqa: E402
from protocol.topics import Topics  # noqa: E402
from simulation.mosquitto import Mosquitto  # noqa: E402
from tier.cluster import NatsCluster  # noqa: E402
from tier.loadgen import open_many, send  # noqa: E402
from tier.nats_io import Nats  # noqa: E402

FLEET = "bench"
N_FEATURES = 9999  # 10,000 parameters with the intercept
PARTITIONS = 8


def _spawn(module: str, *args, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _rss(procs) -> int:
    return sum(psutil.Process(p.pid).memory_info().rss for p in procs)


def _messages(n: int, agents: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    delta = codec.encode(rng.normal(size=N_FEATURES + 1) * 0.01, "int8", rng)
    topics = Topics(FLEET)
    return [(topics.update(f"d{i % agents}"), encode_update(UpdateMessage(f"d{i % agents}", i // agents + 1, 0, 10, delta)))
            for i in range(n)]


def _audit(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_audit(path: Path, want: int, timeout: float, accepted_only: bool = False) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in _audit(path) if not accepted_only or r.get("outcome") == "accepted"]
        if len(rows) >= want or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _figures(times, rows, key) -> dict:
    sent = {key(i): t[0] for i, t in enumerate(times)}
    lat = sorted(r["t"] - sent[(r["agent"], r["seq"])] for r in rows if (r["agent"], r["seq"]) in sent)
    first = min(t[0] for t in times)
    last = max(r["t"] for r in rows) if rows else first
    return {"updates": len(times), "folded": len(rows), "per_s": round(len(rows) / max(last - first, 1e-9), 1),
            "latency_p50_s": round(float(np.percentile(lat, 50)), 3) if lat else None,
            "latency_p99_s": round(float(np.percentile(lat, 99)), 3) if lat else None}


def connections(workdir: Path, n: int) -> dict:
    with NatsCluster(workdir / "conn", 3, PARTITIONS) as cluster:
        servers = [node.proc for node in cluster.nodes]
        me = psutil.Process()
        before, mine = _rss(servers), me.memory_info().rss
        t0 = time.monotonic()

        async def run():
            conns = await open_many(n, [node.mqtt_port for node in cluster.nodes], "idle", timeout=120)
            took = time.monotonic() - t0
            await asyncio.sleep(3)
            after, gen = _rss(servers), me.memory_info().rss
            for c in conns:
                await c.close()
            return took, after, gen

        took, after, gen = asyncio.run(run())
    return {"connections_held": n, "connect_s": round(took, 1),
            "broker_bytes_per_connection": int((after - before) / n),
            "generator_bytes_per_connection": int((gen - mine) / n)}


def tier_run(workdir: Path, workers: int, messages, agents: int, conns: int) -> dict:
    audit = workdir / f"tier{workers}.jsonl"
    with NatsCluster(workdir / f"tier{workers}", 3, PARTITIONS) as cluster:
        common = ["--nats", ",".join(cluster.nats_urls), "--mqtt", ",".join(cluster.mqtt_urls), "--fleet", FLEET]
        procs = [_spawn("tier.root", *common, "--partitions", PARTITIONS, "--model", "sgd-regressor", "--n-features",
                        N_FEATURES, "--buffer-size", 50, "--audit-log", audit, "--log-level", "WARNING",
                        log=workdir / f"root{workers}.log")]
        procs += [_spawn("tier.worker", *common, "--partitions", PARTITIONS, "--id", f"w{k}", "--log-level", "WARNING",
                         log=workdir / f"worker{workers}-{k}.log") for k in range(workers)]
        try:
            nats = Nats(cluster.nats_urls, FLEET, replicas=3)
            want = {f"p{p}" for p in range(PARTITIONS)} | {"root"}
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if want <= set(nats.call(lambda: nats.state.keys(), 5)):
                        break
                except Exception:
                    pass
                time.sleep(0.5)
            nats.close()
            time.sleep(1.5)  # the root publishes its first model once every partition is claimed

            async def run():
                cs = await open_many(conns, [n.mqtt_port for n in cluster.nodes], f"dev{workers}")
                times = await send(cs, messages, window=32)
                for c in cs:
                    await c.close()
                return times

            times = asyncio.run(run())
            rows = _wait_audit(audit, len(messages), 180)
            return dict(_figures(times, rows, lambda i: (f"d{i % agents}", i // agents + 1)), workers=workers)
        finally:
            for p in procs:
                p.kill()
                p.wait(10)


def mosquitto_run(workdir: Path, messages, agents: int, conns: int) -> dict:
    audit = workdir / "coordinator.jsonl"
    with Mosquitto(workdir / "mosq") as broker:
        coord = _spawn("coordinator", "--broker", broker.url, "--fleet", FLEET, "--model", "sgd-regressor",
                       "--n-features", N_FEATURES, "--strategy", "fedbuff", "--buffer-size", 50, "--checkpoint-dir",
                       workdir / "ckpt", "--audit-log", audit, log=workdir / "coordinator.log")
        try:
            log, deadline = workdir / "coordinator.log", time.monotonic() + 120
            while time.monotonic() < deadline and "published version 0" not in (log.read_text() if log.exists() else ""):
                time.sleep(0.2)  # subscribed: mosquitto keeps QoS 1 messages only for subscriptions that exist

            async def run():
                cs = await open_many(conns, [broker.port], "mdev")
                times = await send(cs, messages, window=32)
                for c in cs:
                    await c.close()
                return times

            times = asyncio.run(run())
            rows = _wait_audit(audit, len(messages), 180, accepted_only=True)
            return _figures(times, rows, lambda i: (f"d{i % agents}", i // agents + 1))
        finally:
            coord.kill()
            coord.wait(10)


def markdown(result: dict) -> str:
    """The table docs/benchmarks.md shows (tests/test_scale_out_figures.py keeps the two equal)."""
    c, m = result["connections"], result["coordinator_on_mosquitto"]
    lines = [
        f"Idle MQTT 3.1.1 connections held by the {result['nats_nodes']}-node cluster from one asyncio process: "
        f"{c['connections_held']:,} (opened in {c['connect_s']} s), "
        f"{c['broker_bytes_per_connection'] / 1024:.1f} KiB of broker memory and "
        f"{c['generator_bytes_per_connection'] / 1024:.1f} KiB of generator memory per connection.",
        "",
        "| setup | updates/s | ratio to one coordinator | p50 publish-to-fold | p99 publish-to-fold |",
        "|---|---|---|---|---|",
        f"| one coordinator on mosquitto | {m['per_s']:,.0f} | 1.00 | {m['latency_p50_s']} s | {m['latency_p99_s']} s |",
    ]
    for row in result["tier"]:
        lines.append(f"| tier, {row['workers']} worker(s), {result['partitions']} partitions | {row['per_s']:,.0f} | "
                     f"{row['ratio_to_coordinator']:.2f} | {row['latency_p50_s']} s | {row['latency_p99_s']} s |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000, help="idle MQTT connections to hold")
    parser.add_argument("--updates", type=int, default=2000, help="updates per throughput run")
    parser.add_argument("--agents", type=int, default=200, help="device ids the updates come from")
    parser.add_argument("--device-connections", type=int, default=50, help="connections the updates travel on")
    parser.add_argument("--workers", default="1,2,4", help="partition worker counts to run")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    messages = _messages(args.updates, args.agents)
    with tempfile.TemporaryDirectory(prefix="fedmq-scale-out-") as tmp:
        workdir = Path(tmp)
        result = {"machine_cores": os.cpu_count(), "n_params": N_FEATURES + 1, "codec": "int8",
                  "partitions": PARTITIONS, "nats_nodes": 3, "replicas": 3,
                  "connections": connections(workdir, args.connections),
                  "coordinator_on_mosquitto": mosquitto_run(workdir, messages, args.agents, args.device_connections),
                  "tier": [tier_run(workdir, int(w), messages, args.agents, args.device_connections)
                           for w in args.workers.split(",")]}
    base = result["coordinator_on_mosquitto"]["per_s"]
    for row in result["tier"]:
        row["ratio_to_coordinator"] = round(row["per_s"] / base, 2) if base else None
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
