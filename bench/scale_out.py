"""Scale-out tier benchmark: connections held, memory per connection, updates/s through the tier
with 1, 2 and 4 partition workers beside one coordinator on mosquitto in the same run, and
publish-to-fold latency (device send -> root fold, from the root's audit log), and the kill test's
recovery times (tests/test_tier_kill.py's scenario, tier/fleet.kill_run, several kills per kind),
and a sustained rate from many device ids (short fixed-rate probes, then one long run), every sent
(agent, seq) against the root's audit log. Prints JSON.

    python bench/scale_out.py [--connections 2000] [--updates 2000] [--workers 1,2,4] [--kills 4] [--out FILE]
    python bench/scale_out.py --only sustained [--sustain-probes 400,800] [--sustain-rate 1667 --sustain-s 600]

Everything is real: a 3-node nats-server 2.15 cluster (R3) on loopback, the root and the workers
as processes, devices from tier/loadgen.py (asyncio MQTT 3.1.1, pre-encoded int8 updates of
10,000 parameters). On a 2-core machine the brokers, the tier and the generator share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
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
from tier.fleet import RECOVERY_S, VICTIMS, kill_run, spawn  # noqa: E402
from tier.loadgen import open_many, send  # noqa: E402
from tier.nats_io import Nats  # noqa: E402

FLEET = "bench"
N_FEATURES = 9999  # 10,000 parameters with the intercept
PARTITIONS = 8
# how the workers' per-agent acks travel (docs/architecture.md, "Acks on the tier"): runs without the key in
# bench/results were made when each was a retained QoS 1 MQTT message (one R3 store per update at 100,000 ids)
AGENT_ACKS = "core NATS"


def _acks(run: dict) -> str:
    """How a sustained run's per-agent acks travelled (runs before the key: retained QoS 1 MQTT messages)."""
    return run.get("agent_acks", "retained QoS 1")


def _run_key(run: dict) -> tuple:
    """What a new probe replaces among the kept ones: the same rate, ids, length and acks."""
    return run["rate_asked"], run["devices"], run["seconds_asked"], _acks(run)


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


def connections(workdir: Path, n: int, nodes: int = 3, per_generator: int = 15000) -> dict:
    """Hold `n` idle connections into a `nodes`-node cluster from generator processes of at most
    `per_generator` connections each (a process holds at most its file-descriptor limit), each from its
    own source address 127.0.1.<g> so 127.0.0.1's ephemeral ports stay free for everyone else."""
    with NatsCluster(workdir / f"conn{nodes}", nodes, PARTITIONS) as cluster:
        servers = [node.proc for node in cluster.nodes]
        ports = [node.mqtt_port for node in cluster.nodes]

        async def warm():  # the first connection alone: NATS creates the account's MQTT streams on it
            for c in await open_many(1, ports, "warm", timeout=120):
                await c.close()

        asyncio.run(warm())
        before = _rss(servers)
        counts = [min(per_generator, n - k) for k in range(0, n, per_generator)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        gens = [subprocess.Popen([sys.executable, "-m", "tier.loadgen", "--count", str(k), "--ports",
                                  ",".join(map(str, ports)), "--source", f"127.0.1.{g + 1}", "--prefix", f"idle{g}"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=ROOT, text=True)
                for g, k in enumerate(counts)]
        try:
            opened = [json.loads(g.stdout.readline() or "{}") for g in gens]
            time.sleep(5)  # settled: what the brokers and generators hold now is what these connections cost
            after = _rss(servers)
            fds = [psutil.Process(p.pid).num_fds() for p in servers]
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            for g in gens:
                g.stdin.close()
            ended = [json.loads(g.stdout.readline() or "{}") for g in gens]
        finally:
            for g in gens:
                try:
                    g.wait(60)
                except subprocess.TimeoutExpired:
                    g.kill()
    held = sum(o.get("alive", 0) for o in opened)
    errors = [o["first_error"] for o in opened if o.get("first_error")]
    return {"nats_nodes": nodes, "connections_tried": n, "connections_held": held,
            "held_at_end": sum(e.get("alive_at_end", 0) for e in ended),
            "failed": sum(o.get("failed", 0) for o in opened), "first_error": errors[0] if errors else None,
            "generators": len(gens), "connect_s": max(o.get("connect_s", 0) for o in opened),
            "broker_bytes_per_connection": int((after - before) / max(held, 1)),
            "generator_bytes_per_connection": int(sum(o["rss_after"] - o["rss_before"] for o in opened if o)
                                                  / max(held, 1)),
            "broker_rss_mib": round(after / 2 ** 20), "node_fds": fds, "fd_limit_per_process": limit,
            "load_avg_1m": round(os.getloadavg()[0], 1)}


class _Tier:
    """A 3-node cluster with the root and `workers` partition workers as processes, until the first model."""

    def __init__(self, workdir: Path, name: str, workers: int, *worker_args) -> None:
        self.workdir, self.name, self.audit = workdir, name, workdir / f"{name}.jsonl"
        self.cluster = NatsCluster(workdir / name, 3, PARTITIONS).start()
        common = ["--nats", ",".join(self.cluster.nats_urls), "--mqtt", ",".join(self.cluster.mqtt_urls),
                  "--fleet", FLEET]
        self.procs = [spawn("tier.root", *common, "--partitions", PARTITIONS, "--model", "sgd-regressor",
                             "--n-features", N_FEATURES, "--buffer-size", 50, "--audit-log", self.audit,
                             "--log-level", "WARNING", log=workdir / f"{name}-root.log")]
        self.procs += [spawn("tier.worker", *common, "--partitions", PARTITIONS, "--id", f"w{k}", "--log-level",
                              "WARNING", *worker_args, log=workdir / f"{name}-worker{k}.log") for k in range(workers)]
        nats = Nats(self.cluster.nats_urls, FLEET, replicas=3)
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

    @property
    def ports(self) -> list[int]:
        return [n.mqtt_port for n in self.cluster.nodes]

    def rss(self) -> int:
        return _rss(self.procs + [n.proc for n in self.cluster.nodes])

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait(10)
        self.cluster.stop()


def tier_run(workdir: Path, workers: int, messages, agents: int, conns: int) -> dict:
    tier = _Tier(workdir, f"tier{workers}", workers)
    try:
        async def run():
            cs = await open_many(conns, tier.ports, f"dev{workers}")
            times = await send(cs, messages, window=32)
            for c in cs:
                await c.close()
            return times

        times = asyncio.run(run())
        rows = _wait_audit(tier.audit, len(messages), 180)
        return dict(_figures(times, rows, lambda i: (f"d{i % agents}", i // agents + 1)), workers=workers)
    finally:
        tier.stop()


def _cpu(kinds: dict) -> dict:
    """CPU seconds (user + system) used so far by each kind of process."""
    def used(p) -> float:
        try:
            t = psutil.Process(p.pid).cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0
    return {k: sum(used(p) for p in procs) for k, procs in kinds.items()}


def _cuts(tier: "_Tier") -> dict:
    """From the nodes' logs (asserted found): connections NATS closed as slow consumers, and those it closed
    because a QoS 1 store was not confirmed within its JetStream timeout; partition sessions apart."""
    logs = [n.log.read_text(errors="replace").splitlines() for n in tier.cluster.nodes]
    assert all(logs), f"no NATS log under {tier.cluster.workdir}"
    lines = [line for log in logs for line in log]
    slow = [line for line in lines if "Slow Consumer Detected" in line]
    store = [line for line in lines if "closing the connection" in line]
    session = f'"agg-{FLEET}-p'
    return {"slow_consumer_closes": len(slow), "slow_consumer_session_closes": sum(session in x for x in slow),
            "store_timeout_closes": len(store), "store_timeout_session_closes": sum(session in x for x in store)}


def sustained(workdir: Path, rate: float, seconds: float, devices: int, workers: int, conns: int,
              name: str = "sustained") -> dict:
    """`rate` updates/s from `devices` device ids for `seconds` through the tier: every (agent, seq) sent
    against what the root folded (lost, counted twice), how far the folds lag the sends, connections NATS
    cut, the CPU each kind of process used (cores) while sending, the load. A device connection cut before
    its PUBACKs came is opened again and its unacknowledged updates sent again (a device's resend)."""
    n = int(rate * seconds)
    rng = np.random.default_rng(0)
    delta = codec.encode(rng.normal(size=N_FEATURES + 1) * 0.01, "int8", rng)
    topics = Topics(FLEET)

    def messages():  # encoded as they are sent: n payloads of 10 KB would not fit in memory
        for i in range(n):
            agent = f"d{i % devices}"
            yield topics.update(agent), encode_update(UpdateMessage(agent, i // devices + 1, 0, 10, delta))

    load_before = os.getloadavg()[0]
    # the updates all claim base version 0: staleness is not what this run measures
    tier = _Tier(workdir, name, workers, "--max-staleness", 10 ** 9)
    try:
        kinds = {"nats_servers": [n.proc for n in tier.cluster.nodes], "root": tier.procs[:1],
                 "workers": tier.procs[1:], "loadgen": [psutil.Process()]}

        async def run():
            cs = await open_many(conns, tier.ports, "sdev")
            cpu0, t0 = _cpu(kinds), time.monotonic()
            times = await send(cs, messages(), rate=rate, window=64, resend=5)
            took = time.monotonic() - t0
            cpu = {k: round((v - cpu0[k]) / took, 2) for k, v in _cpu(kinds).items()}
            for c in cs:
                await c.close()
            return times, took, cpu, sum(c.reopens for c in cs), sum(c.resent for c in cs)

        times, took, cpu, reopens, resent = asyncio.run(run())
        load_during = os.getloadavg()[0]
        rss = tier.rss()
        rows = _wait_audit(tier.audit, n, 120 + seconds)
        sent = {(f"d{i % devices}", i // devices + 1) for i in range(n)}
        folded = [(r["agent"], r["seq"]) for r in rows]
        lag = sorted(r["t"] - times[(int(r["agent"][1:]) + (r["seq"] - 1) * devices)][0] for r in rows
                     if (r["agent"], r["seq"]) in sent)
        return {"rate_asked": rate, "seconds_asked": seconds, "devices": devices, "workers": workers,
                "agent_acks": AGENT_ACKS,
                "device_connections": conns, "sent": n, "send_s": round(took, 1), "sent_per_s": round(n / took, 1),
                "unacknowledged": sum(1 for _, a in times if not a), "folded": len(set(folded)),
                # the last fold after the last send: the backlog the tier had at the end of the sending
                "drain_s": round(max(r["t"] for r in rows) - max(t for t, _ in times), 1) if rows else None,
                "lost": len(sent - set(folded)), "counted_twice": len(folded) - len(set(folded)),
                "latency_p50_s": round(float(np.percentile(lag, 50)), 3) if lag else None,
                "latency_p99_s": round(float(np.percentile(lag, 99)), 3) if lag else None,
                "latency_max_s": round(lag[-1], 3) if lag else None, "tier_rss_mib": round(rss / 2 ** 20),
                "device_reconnects": reopens, "device_resends": resent, **_cuts(tier),
                "cpu_cores_while_sending": cpu,
                "load_avg_1m_before": round(load_before, 1), "load_avg_1m_end": round(load_during, 1)}
    finally:
        tier.stop()


def mosquitto_run(workdir: Path, messages, agents: int, conns: int) -> dict:
    audit = workdir / "coordinator.jsonl"
    with Mosquitto(workdir / "mosq") as broker:
        coord = spawn("coordinator", "--broker", broker.url, "--fleet", FLEET, "--model", "sgd-regressor",
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


def kills(workdir: Path, per_kind: int, seed: int) -> dict:
    """tests/test_tier_kill.py's scenario, `per_kind` kills -9 of each kind on a fresh 3-node cluster (4
    partitions, 2 workers, a root and a standby): seconds until the model advanced again after each, and
    the run's exactly-once check (the test's own, asserted) once the devices stop."""
    out = {"kills_per_kind": per_kind, "seed": seed, "bound_s": RECOVERY_S, "partitions": 4,
           "load_avg_1m_before": round(os.getloadavg()[0], 1)}
    for victim in VICTIMS:
        run_dir = workdir / f"kill-{victim}"
        run_dir.mkdir(parents=True)
        with NatsCluster(run_dir / "nats", 3, 4) as cluster, \
                kill_run(cluster, run_dir, random.Random(f"{seed}-{victim}")) as run:
            each = [run.kill(victim) for _ in range(per_kind)]
            checked = run.verify()
        out[victim] = {"recovery_s": each, "max_s": max(each), "median_s": round(float(np.median(each)), 2),
                       **checked}
    out["load_avg_1m_end"] = round(os.getloadavg()[0], 1)
    return out


def markdown(result: dict) -> str:
    """The tables docs/benchmarks.md shows (tests/test_scale_out_figures.py keeps the two equal)."""
    m = result["coordinator_on_mosquitto"]
    lines = [
        "| NATS nodes | connections tried | held (at the end) | failed | generator processes | opened in | "
        "broker memory per connection | generator memory per connection | open files per node | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["connections"]:
        lines.append(f"| {c['nats_nodes']} | {c['connections_tried']:,} | {c['connections_held']:,} "
                     f"({c['held_at_end']:,}) | {c['failed']:,} | {c['generators']} | {c['connect_s']} s | "
                     f"{c['broker_bytes_per_connection'] / 1024:.1f} KiB | "
                     f"{c['generator_bytes_per_connection'] / 1024:.1f} KiB | "
                     f"{', '.join(f'{f:,}' for f in c['node_fds'])} of {c['fd_limit_per_process']:,} | "
                     f"{c['load_avg_1m']} |")
    lines += [
        "",
        "| setup | updates/s | ratio to one coordinator | p50 publish-to-fold | p99 publish-to-fold |",
        "|---|---|---|---|---|",
        f"| one coordinator on mosquitto | {m['per_s']:,.0f} | 1.00 | {m['latency_p50_s']} s | {m['latency_p99_s']} s |",
    ]
    for row in result["tier"]:
        lines.append(f"| tier, {row['workers']} worker(s), {result['partitions']} partitions | {row['per_s']:,.0f} | "
                     f"{row['ratio_to_coordinator']:.2f} | {row['latency_p50_s']} s | {row['latency_p99_s']} s |")
    if "kills" in result:
        k = result["kills"]
        lines += ["", "| kill -9 of | kills | model advancing again after (each) | median | max | updates sent | "
                      "lost | counted twice |", "|---|---|---|---|---|---|---|---|"]
        for victim, name in (("worker", "a partition worker"), ("root", "the active root"), ("nats", "a NATS node of 3")):
            r = k[victim]
            lines.append(f"| {name} | {len(r['recovery_s'])} | {', '.join(f'{t} s' for t in r['recovery_s'])} | "
                         f"{r['median_s']} s | {r['max_s']} s | {r['updates']:,} | {r['lost']} | {r['counted_twice']} |")
    runs = [*result.get("sustained_probes", []), *([result["sustained"]] if "sustained" in result else [])]
    if runs:
        lines += ["", "| run | device ids | updates/s asked | sent/s | updates | lost | counted twice | p50 / p99 send-to-fold | "
                      "backlog at the end | devices cut (store timeout), resent | partition sessions cut | "
                      "CPU cores: nats-servers, workers, root, generator | load (1 min) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            c = r["cpu_cores_while_sending"]
            cut = r["slow_consumer_session_closes"] + r["store_timeout_session_closes"]
            lines.append(f"| {r['seconds_asked']:g} s, acks {_acks(r)} | {r['devices']:,} | {r['rate_asked']:,.0f} | {r['sent_per_s']:,.0f} | {r['sent']:,} | "
                         f"{r['lost']} | {r['counted_twice']} | {r['latency_p50_s']} s / {r['latency_p99_s']} s | "
                         f"{r['drain_s']} s | {r['device_reconnects']:,}, {r['device_resends']:,} | {cut} | "
                         f"{c['nats_servers']}, {c['workers']}, {c['root']}, {c['loadgen']} | "
                         f"{r['load_avg_1m_before']}-{r['load_avg_1m_end']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000, help="idle MQTT connections to hold")
    parser.add_argument("--nats-nodes", default="3", help="cluster sizes to hold them with, comma-separated")
    parser.add_argument("--per-generator", type=int, default=15000,
                        help="idle connections per generator process (under its open-files limit)")
    parser.add_argument("--updates", type=int, default=2000, help="updates per throughput run")
    parser.add_argument("--agents", type=int, default=200, help="device ids the updates come from")
    parser.add_argument("--device-connections", type=int, default=50, help="connections the updates travel on")
    parser.add_argument("--workers", default="1,2,4", help="partition worker counts to run")
    parser.add_argument("--sustain-rate", type=float, default=1667.0, help="updates/s of the sustained run")
    parser.add_argument("--sustain-s", type=float, default=600.0, help="seconds of the sustained run")
    parser.add_argument("--sustain-devices", type=int, default=100_000, help="device ids of the sustained run")
    parser.add_argument("--sustain-workers", type=int, default=2, help="partition workers of the sustained run")
    parser.add_argument("--sustain-probes", help="before the sustained run, runs of --sustain-probe-s seconds at "
                                                 "these updates/s (comma-separated; kept as sustained_probes)")
    parser.add_argument("--sustain-probe-s", type=float, default=60.0, help="seconds of each probe run")
    parser.add_argument("--kills", type=int, default=4, help="kills -9 per kind (worker, root, NATS node) of the kill run")
    parser.add_argument("--kill-seed", type=int, help="seed of the kills' moments and victims (default: random)")
    parser.add_argument("--only", choices=("connections", "throughput", "sustained", "kills"),
                        help="run one part and keep the other parts of --out as they are")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--workdir", help="keep the runs' configs, logs and stores here (default: a temporary "
                                          "directory, removed at the end)")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = json.loads(Path(args.out).read_text()) if args.only and args.out and Path(args.out).exists() else {}
    result.update({"machine_cores": os.cpu_count(), "n_params": N_FEATURES + 1, "codec": "int8",
                   "partitions": PARTITIONS, "replicas": 3})
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else \
            Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedmq-scale-out-")))
        workdir.mkdir(parents=True, exist_ok=True)
        if args.only in (None, "connections"):
            result["connections"] = [connections(workdir, args.connections, int(k), args.per_generator)
                                     for k in args.nats_nodes.split(",")]
        if args.only in (None, "sustained"):
            if args.sustain_probes:  # replacing the kept probes of the same rate and device ids
                probes = [sustained(workdir, float(r), args.sustain_probe_s, args.sustain_devices, args.sustain_workers,
                                    args.device_connections, name=f"probe{r}") for r in args.sustain_probes.split(",")]
                done = {_run_key(p) for p in probes}
                kept = [p for p in result.get("sustained_probes", []) if _run_key(p) not in done]
                result["sustained_probes"] = sorted(kept + probes, key=lambda p: (-p["devices"], p["rate_asked"],
                                                                                  p["seconds_asked"], _acks(p) == AGENT_ACKS))
            if args.sustain_s > 0:
                result["sustained"] = sustained(workdir, args.sustain_rate, args.sustain_s, args.sustain_devices,
                                                args.sustain_workers, args.device_connections)
        if args.only in (None, "kills"):
            seed = args.kill_seed if args.kill_seed is not None else random.randrange(1 << 30)
            result["kills"] = kills(workdir, args.kills, seed)
        if args.only in (None, "throughput"):
            messages = _messages(args.updates, args.agents)
            result["nats_nodes"] = 3
            result["coordinator_on_mosquitto"] = mosquitto_run(workdir, messages, args.agents, args.device_connections)
            result["tier"] = [tier_run(workdir, int(w), messages, args.agents, args.device_connections)
                              for w in args.workers.split(",")]
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
