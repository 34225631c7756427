"""The asynchronous advantage where it matters: a task that needs tens of rounds, log-normal stragglers,
Flower 1.41 FedAvg and FedProx beside fedmq's fedasync, fedbuff and fedavg, in one run.

The task: `many_classes` (simulation/datasets.py: 20 overlapping Gaussian classes, 40
features) split with --partition (default shards:4, four of the 20 classes a device), one
CSV shard per device; the centralized ceiling (simulation.datasets.centralized_baseline: the
same SGD model, 20 epochs on the pooled train split) is computed in the same run. Device
speeds: each device's round lasts --round-time x its slowdown exp(N(0, SIGMA^2))
(simulation/stragglers.py, the same draw for every system of a seed), applied as the same
padding of each local round (bench/padding.py) in Flower clients and fedmq agents. Every device
is its own process; fedmq runs over a real mosquitto with the real coordinator.

With --dataset sensors (a regression on sixteen correlated sensor readings, scored by r2) the
model is an SGDRegressor on both sides (fedmq's sgd-regressor) and every "accuracy" figure is r2.

Per system and seed: the time from the first local round to 90% and 95% of the ceiling (the
coordinator's status accuracy for fedmq, the server's evaluation after each round for
Flower), updates aggregated by then, the devices' bytes by then (tcpdump on loopback: every
IP packet of the devices' connections from connect on), the devices' CPU from the first round
to then (/proc, sampled every 0.25 s), and the final accuracy. Flower FedAvg runs --rounds
rounds; every other system runs for the same time from its first round, so final accuracy is
compared at equal wall time. Writes bench/results/async_advantage.json.

    python bench/async_advantage.py [--seeds 3] [--flower-python .flwr-venv/bin/python]
    python bench/async_advantage.py --quick     (a smoke run: 4 devices, 1 seed, 3 rounds)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.device_bytes import Capture, client_ports, pcap_bytes, spawn  # noqa: E402
from protocol.tabular import write_csv  # noqa: E402
from protocol.topics import Topics  # noqa: E402
from simulation.datasets import centralized_baseline, load_dataset  # noqa: E402
from simulation.mosquitto import Mosquitto, free_port  # noqa: E402
from simulation.partition import partition  # noqa: E402
from simulation.stragglers import slowdowns  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
FLOWER_PYTHON = str(ROOT.parent / ".flwr-venv" / "bin" / "python")
if not Path(FLOWER_PYTHON).exists():
    FLOWER_PYTHON = str(ROOT / ".flwr-venv" / "bin" / "python")
FRACTIONS = (0.90, 0.95)  # of the centralized ceiling
# fedmq systems: the coordinator's flags on top of its defaults ("{agents}" is the fleet size)
FEDMQ_SYSTEMS = {
    "fedmq fedasync": ["--strategy", "fedasync"],
    "fedmq fedbuff": ["--strategy", "fedbuff"],
    "fedmq fedavg": ["--strategy", "fedavg"],
}
FLOWER_SYSTEMS = {"Flower FedAvg": "fedavg", "Flower FedProx": "fedprox"}


@dataclass
class Probe:
    """One device process: its log, its TCP port to the server, and its CPU over time."""

    proc: subprocess.Popen
    log: Path
    port: int | None = None
    cpu: list[tuple[float, float]] = field(default_factory=list)  # (wall time, CPU seconds)

    def sample(self) -> None:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return
        self.cpu.append((time.time(), (int(fields[11]) + int(fields[12])) / TICK))

    def round_starts(self) -> list[float]:
        return [float(t) for t in re.findall(r"round start ([\d.]+)", self.log.read_text(errors="replace"))]

    def updates_sent(self, flower: bool) -> int:
        """Updates this device sent (fedmq's 'sent update' log lines, a Flower client's 'fit N' lines)."""
        return len(re.findall(r"^fit \d+" if flower else r"sent (?:held )?update:", self.log.read_text(errors="replace"),
                              re.MULTILINE))


def cpu_at(series: list[tuple[float, float]], t: float) -> float:
    """CPU seconds of a process at wall time `t`: the last sample at or before it (0 before any)."""
    return max((c for when, c in series if when <= t), default=0.0)


def first_at(timeline: list[tuple[float, float, int]], target: float) -> tuple[float, int] | None:
    """(seconds, updates aggregated) of the first point of (seconds, accuracy, updates) at or above `target`."""
    return next(((t, n) for t, acc, n in timeline if acc >= target), None)


def packet_times(path: Path, server_port: int) -> list[tuple[float, int, int]]:
    """(timestamp, client port, IP bytes) of every TCP packet to or from `server_port` in a pcap."""
    data = path.read_bytes()
    endian = "<" if struct.unpack("<I", data[:4])[0] in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    nano = struct.unpack(endian + "I", data[:4])[0] in (0xA1B23C4D, 0x4D3CB2A1)
    link = {1: 14, 113: 16, 0: 4}[struct.unpack(endian + "I", data[20:24])[0]]
    out, pos = [], 24
    while pos + 16 <= len(data):
        sec, frac, incl, orig = struct.unpack(endian + "IIII", data[pos:pos + 16])
        ip = data[pos + 16 + link:pos + 16 + incl]
        pos += 16 + incl
        if not ip or ip[0] >> 4 not in (4, 6):
            continue
        tcp = ip[(ip[0] & 0x0F) * 4 if ip[0] >> 4 == 4 else 40:]
        sport, dport = struct.unpack(">HH", tcp[:4])
        if server_port not in (sport, dport):
            continue
        out.append((sec + frac / (1e9 if nano else 1e6), sport if dport == server_port else dport, orig - link))
    return out


def bytes_until(packets: list[tuple[float, int, int]], ports: set[int], t: float) -> int:
    """IP bytes of the `ports`' connections up to wall time `t`."""
    return sum(n for when, port, n in packets if port in ports and when <= t)


def sample_until(probes: list[Probe], server_port: int, done, timeout: float) -> None:
    """Sample the devices' CPU (and learn their ports) until done() or `timeout` seconds."""
    deadline, ports_at = time.monotonic() + timeout, 0.0
    while time.monotonic() < deadline:
        for p in probes:
            p.sample()
        missing = {p.proc.pid: p for p in probes if p.port is None}
        if missing and time.monotonic() - ports_at > 0.5:  # ss reads all of /proc: not at every sample
            ports_at = time.monotonic()
            for pid, port in client_ports(set(missing), server_port).items():
                missing[pid].port = port
        if done():
            return
        time.sleep(0.25)  # sampling /proc: there is no event to wait on
    raise RuntimeError("the run did not finish in time")


def breakdown(wire: dict[int, dict], ports: set[int], updates: int) -> dict:
    """Where the devices' bytes went over the whole run, per update the devices sent: each kind of
    device_bytes.pcap_bytes (MQTT packet type and topic, IP/TCP headers, TCP-only segments) summed over
    the `ports`' connections, with its packets (segments) and, for a PUBLISH, how much of it is MQTT
    header (fixed header, topic, packet id)."""
    kinds: dict[str, list[int]] = {}
    headers: dict[str, int] = {}
    for port in ports & set(wire):
        for kind, (nbytes, count) in wire[port]["kinds"].items():
            k = kinds.setdefault(kind, [0, 0])
            k[0], k[1] = k[0] + nbytes, k[1] + count
        for kind, (nbytes, _) in wire[port].get("publish_headers", {}).items():
            headers[kind] = headers.get(kind, 0) + nbytes
    per = max(updates, 1)
    out = {}
    for kind, (nbytes, count) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        out[kind] = {"bytes_per_update": round(nbytes / per, 1), "packets_per_update": round(count / per, 3)}
        if kind in headers:
            out[kind]["mqtt_header_bytes_per_update"] = round(headers[kind] / per, 1)
    return {"updates_sent": updates, "bytes_per_update": round(sum(k[0] for k in kinds.values()) / per, 1),
            "kinds": out}


def figures(name: str, probes: list[Probe], capture: Path, server_port: int, timeline: list, ceiling: float,
            end: float) -> dict:
    """The per-run figures from the devices' round starts, the accuracy timeline (wall time, accuracy,
    updates) and the capture: times, updates, bytes and CPU to each fraction of the ceiling; finals;
    where the bytes went (`breakdown`)."""
    packets = packet_times(capture, server_port)
    starts = [min(s) for s in (p.round_starts() for p in probes) if s]
    if not starts:
        raise RuntimeError(f"{name}: no device started a round")
    t0 = min(starts)
    ports = {p.port for p in probes if p.port is not None}
    if len(ports) != len(probes):
        raise RuntimeError(f"{name}: the connection of {len(probes) - len(ports)} devices was not seen")
    rel = [(t - t0, acc, n) for t, acc, n in timeline if t <= end]
    out: dict = {"system": name, "final_accuracy": round(rel[-1][1], 4) if rel else None,
                 "updates": rel[-1][2] if rel else 0, "seconds": round(end - t0, 2),
                 "device_bytes": bytes_until(packets, ports, end),
                 "device_cpu_s": round(sum(cpu_at(p.cpu, end) - cpu_at(p.cpu, t0) for p in probes), 3)}
    for frac in FRACTIONS:
        key = f"{round(frac * 100)}"
        hit = first_at(rel, frac * ceiling)
        if hit is None:
            out.update({f"time_to_{key}_s": None, f"updates_to_{key}": None, f"device_bytes_to_{key}": None,
                        f"device_cpu_s_to_{key}": None})
            continue
        t, n = hit
        out.update({f"time_to_{key}_s": round(t, 2), f"updates_to_{key}": n,
                    f"device_bytes_to_{key}": bytes_until(packets, ports, t0 + t),
                    f"device_cpu_s_to_{key}": round(sum(cpu_at(p.cpu, t0 + t) - cpu_at(p.cpu, t0) for p in probes), 3)})
    flower = name in FLOWER_SYSTEMS
    out["breakdown"] = breakdown(pcap_bytes(capture, server_port, mqtt=not flower), ports,
                                 sum(p.updates_sent(flower) for p in probes))
    out["timeline"] = [[round(t, 2), round(acc, 4), n] for t, acc, n in rel]
    return out


@dataclass
class Task:
    data: Path
    n_features: int
    classes: int  # 0: a regression
    agents: int
    pads: list[float]
    ceiling: float
    metric: str  # what the ceiling and every "accuracy" figure are: accuracy, or r2


def write_task(workdir: Path, args: argparse.Namespace, seed: int) -> Task:
    """The seed's shards (agent<i>.csv), test.csv, device pads and ceiling."""
    ds = load_dataset(args.dataset, seed=seed)
    if ds.task not in ("classification", "regression"):
        raise SystemExit(f"--dataset {args.dataset}: a classification or regression task ({ds.task} is neither)")
    ceiling = centralized_baseline(ds, seed=seed)
    parts = partition(ds.y_train, args.agents, args.partition, seed=seed)
    workdir.mkdir(parents=True)
    for i, rows in enumerate(parts):
        write_csv(workdir / f"agent{i}.csv", ds.X_train[rows], ds.y_train[rows])
    write_csv(workdir / "test.csv", ds.X_test, ds.y_test)
    slow = slowdowns(np.random.default_rng([seed, 1]), args.agents, f"lognormal:{args.sigma}")
    return Task(workdir, ds.n_features, len(ds.classes), args.agents, [args.round_time * s for s in slow], ceiling,
                ds.metric)


def flower_timeline(server_log: str, agents: int) -> list[tuple[float, float, int]]:
    """(wall time, score, updates aggregated) after each round, from bench/flower_baseline.py's server log
    (`round R accuracy A time T`, or `r2` for a regression: negative early on)."""
    return [(float(t), float(a), int(r) * agents)
            for r, a, t in re.findall(r"round (\d+) (?:accuracy|r2) (-?[\d.]+) time ([\d.]+)", server_log)]


def run_flower(run_dir: Path, python: str, task: Task, strategy: str, rounds: int, mu: float) -> tuple:
    """Flower's server and one client process per device; (probes, capture, port, timeline, end)."""
    run_dir.mkdir()
    port = free_port()
    capture = Capture(run_dir / "capture.pcap", port)
    address = f"127.0.0.1:{port}"
    script = ROOT / "bench" / "flower_baseline.py"
    common = ["--address", address, "--data", task.data, "--classes", task.classes]
    server = spawn([python, script, "server", *common, "--clients", task.agents, "--rounds", rounds,
                    "--strategy", strategy, "--proximal-mu", mu], run_dir / "server.log")
    probes = []
    try:
        for i, pad in enumerate(task.pads):
            log = run_dir / f"client{i}.log"
            probes.append(Probe(spawn([python, script, "client", *common, "--index", i, "--pad", f"{pad:.4f}"], log), log))
        sample_until(probes, port, lambda: server.poll() is not None, 1800)
    finally:
        for p in [p.proc for p in probes] + [server]:
            if p.poll() is None:
                p.kill()
        time.sleep(0.5)  # the last packets reach the capture buffer
        capture.stop()
    timeline = flower_timeline((run_dir / "server.log").read_text(), task.agents)
    return probes, capture.path, port, timeline, timeline[-1][0] if timeline else time.time()


def run_fedmq(run_dir: Path, task: Task, flags: list[str], seconds: float) -> tuple:
    """mosquitto, the coordinator with `flags` (those after a `--agents` among them go to every agent)
    and one padded agent process per device, for `seconds` from the first local round;
    (probes, capture, port, timeline, end)."""
    flags, agent_flags = (flags[:flags.index("--agents")], flags[flags.index("--agents") + 1:]) \
        if "--agents" in flags else (flags, [])
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    run_dir.mkdir()
    broker = Mosquitto(run_dir / "broker")
    capture = None
    topics = Topics("advantage")
    timeline: list = []

    def on_message(client, userdata, msg):
        status = json.loads(msg.payload)
        score = status.get("accuracy" if task.classes else "r2")
        if score is not None:
            timeline.append((time.time(), float(score), int(status.get("accepted") or 0)))

    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-advantage-{os.getpid()}")
    watcher.on_message = on_message
    probes, coordinator = [], None
    broker.start()
    try:  # the broker is stopped whatever fails after it started (a missing tcpdump left it running)
        watcher.connect(broker.host, broker.port)
        watcher.subscribe(topics.coordinator_status, 0)
        watcher.loop_start()
        capture = Capture(run_dir / "capture.pcap", broker.port)
        for i, pad in enumerate(task.pads):
            log = run_dir / f"agent{i}.log"
            argv = [sys.executable, ROOT / "bench" / "padding.py", f"{pad:.4f}", "--broker", broker.url,
                    "--fleet", topics.fleet, "--id", f"agent{i}", "--data", task.data / f"agent{i}.csv",
                    "--seed", i, "--no-feature-stats", "--log-level", "INFO", *agent_flags]
            probes.append(Probe(spawn(argv, log), log))
        model = ["--model", "sgd-classifier", "--classes", ",".join(map(str, range(task.classes)))] if task.classes \
            else ["--model", "sgd-regressor"]
        # the coordinator starts once every agent waits for its first model, as Flower's first round waits for all
        sample_until(probes, broker.port, lambda: all("waiting for the global model" in p.log.read_text(errors="replace")
                                                      for p in probes), 600)
        coordinator = spawn([sys.executable, "-m", "coordinator", "--broker", broker.url, "--fleet", topics.fleet,
                             *model, "--n-features", task.n_features, "--eval-csv", task.data / "test.csv",
                             "--no-feature-stats", *[str(f).replace("{agents}", str(task.agents)) for f in flags]],
                            run_dir / "coordinator.log")
        t0: list[float] = []

        def done() -> bool:
            if coordinator.poll() is not None:
                raise RuntimeError(f"the coordinator exited: {(run_dir / 'coordinator.log').read_text()[-2000:]}")
            if not t0:
                starts = [s for p in probes for s in p.round_starts()[:1]]
                if starts:
                    t0.append(min(starts))
            return bool(t0) and time.time() >= t0[0] + seconds

        sample_until(probes, broker.port, done, seconds + 600)
        end = time.time()
    finally:
        stop([p.proc for p in probes] + ([coordinator] if coordinator is not None else []))
        time.sleep(0.5)
        if capture is not None:
            capture.stop()
        watcher.loop_stop()
        watcher.disconnect()
        broker.stop()
    return probes, capture.path, broker.port, timeline, end


def stop(procs: list[subprocess.Popen], grace: float = 30.0) -> None:
    """SIGTERM each, then SIGKILL what is still running after `grace` seconds (a device that does not
    stop in time must not end the benchmark)."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def spread(values: list) -> dict:
    """Median, min and max over the seeds (None when a seed never got there)."""
    if not values or any(v is None for v in values):
        return {"median": None, "min": None, "max": None, "reached": sum(v is not None for v in values)}
    return {"median": round(statistics.median(values), 3), "min": min(values), "max": max(values),
            "reached": len(values)}


SUMMED = ("time_to_90_s", "time_to_95_s", "updates_to_95", "device_bytes_to_95", "device_cpu_s_to_95",
          "final_accuracy", "updates", "device_bytes", "device_cpu_s")


def summarize(runs: list[dict], systems: list[str]) -> dict:
    """Per system the spread over seeds of each figure, and fedmq's ratios to Flower FedAvg."""
    out = {}
    for name in systems:
        rows = [r for r in runs if r["system"] == name]
        out[name] = {"seeds": len(rows), **{k: spread([r[k] for r in rows]) for k in SUMMED}}
        out[name]["final_vs_ceiling"] = spread([round(r["final_accuracy"] / r["ceiling"], 4) for r in rows])
    base = out.get("Flower FedAvg")
    for name in systems:
        if base is None or name == "Flower FedAvg":
            continue
        for k in ("time_to_95_s", "device_bytes_to_95", "device_cpu_s_to_95"):
            a, b = out[name][k]["median"], base[k]["median"]
            out[name][f"{k}_vs_flower_fedavg"] = None if a is None or not b else round(a / b, 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flower-python", default=FLOWER_PYTHON, help="a Python with flwr 1.41 and scikit-learn")
    p.add_argument("--dataset", default="many_classes")
    p.add_argument("--partition", default="shards:4")
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="run seeds FIRST .. FIRST + SEEDS - 1")
    p.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                   help="no run: merge the runs of these results files (the same settings, other seeds) into --out")
    p.add_argument("--rounds", type=int, default=30, help="Flower FedAvg's rounds; the others run as long")
    p.add_argument("--round-time", type=float, default=0.5, help="seconds of a median device's local round")
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal SIGMA of the device slowdowns")
    p.add_argument("--proximal-mu", type=float, default=0.1, help="Flower FedProx's mu")
    p.add_argument("--system", action="append", default=[], metavar="NAME",
                   help="run only these systems (repeatable; Flower FedAvg, the reference, and every --fedmq always run): " + ", ".join([*FLOWER_SYSTEMS, *FEDMQ_SYSTEMS]))
    p.add_argument("--fedmq", action="append", default=[], metavar="NAME=FLAGS",
                   help="an extra fedmq system: its coordinator flags, then --agents and the agents' flags, e.g. "
                   "'fedbuff int4=--strategy fedbuff --model-codec int4 --agents --codec topk:0.25+int4'")
    p.add_argument("--quick", action="store_true", help="a smoke run: 4 devices, 1 seed, 3 rounds, 0.1 s rounds")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "async_advantage.json")
    args = p.parse_args()
    if args.quick:
        args.agents, args.seeds, args.rounds, args.round_time = 4, 1, 3, 0.1
        args.partition = "iid"
    if args.combine:
        combine(args.combine, args.out)
        return
    fedmq = dict(FEDMQ_SYSTEMS)
    for spec in args.fedmq:
        name, _, flags = spec.partition("=")
        if not name.strip() or not flags.split() or not flags.split()[0].startswith("--"):
            p.error(f"--fedmq {spec!r}: give NAME=FLAGS, the flags starting with '--' (a NAME cannot hold '=')")
        fedmq[name] = flags.split()
    systems = [*FLOWER_SYSTEMS, *fedmq]
    if args.system:
        systems = [s for s in systems if s in args.system or s == "Flower FedAvg" or s not in FEDMQ_SYSTEMS | FLOWER_SYSTEMS]
    started, runs = time.monotonic(), []
    with tempfile.TemporaryDirectory(prefix="async-advantage-") as tmp:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            task = write_task(Path(tmp) / f"seed{seed}", args, seed)
            budget = None
            for name in systems:
                run_dir = Path(tmp) / f"seed{seed}-{name.replace(' ', '-')}"
                if name in FLOWER_SYSTEMS:
                    out = run_flower(run_dir, args.flower_python, task, FLOWER_SYSTEMS[name], args.rounds, args.proximal_mu)
                else:
                    out = run_fedmq(run_dir, task, fedmq[name], budget)
                probes, capture, port, timeline, end = out
                row = figures(name, probes, capture, port, timeline, task.ceiling, end)
                if name == "Flower FedAvg":
                    budget = row["seconds"]
                row.update({"seed": seed, "ceiling": round(task.ceiling, 4)})
                runs.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "timeline"}), flush=True)
                args.out.with_suffix(".partial.json").write_text(json.dumps(runs) + "\n")  # a crash keeps the runs
    result = {
        "benchmark": "async_advantage", "dataset": args.dataset, "metric": task.metric, "partition": args.partition,
        "agents": args.agents, "seeds": args.seeds, "flower_rounds": args.rounds, "round_time_s": args.round_time,
        "speed": f"lognormal:{args.sigma:g}", "proximal_mu": args.proximal_mu, "fractions_of_ceiling": list(FRACTIONS),
        "fedmq_systems": {k: v for k, v in fedmq.items() if k in systems},
        "load_average_at_end": round(os.getloadavg()[0], 1), "seconds": round(time.monotonic() - started, 1),
        "summary": summarize(runs, systems), "runs": runs,
    }
    write(result, args.out)


def write(result: dict, out: Path) -> None:
    """The results file, and each system's medians on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for name, row in result["summary"].items():
        print(name, json.dumps({k: v["median"] if isinstance(v, dict) else v for k, v in row.items()}), flush=True)


def combine(paths: list[Path], out: Path) -> None:
    """One results file from runs of the same settings on other seeds: every run, the summary over all."""
    loaded = [json.loads(p.read_text()) for p in paths]
    full = [part for part in loaded if isinstance(part, dict)]
    if not full:
        raise SystemExit("--combine needs at least one whole results file (the settings)")
    # a .partial.json (the runs a cut-short run finished) is a list of runs
    parts = full + [{"runs": part, "seconds": None, "load_average_at_end": None} for part in loaded if isinstance(part, list)]
    result = dict(full[0])
    result["runs"] = sorted((r for part in parts for r in part["runs"]), key=lambda r: r["seed"])
    result["seeds"] = len({r["seed"] for r in result["runs"]})
    result["seconds"] = [part["seconds"] for part in parts]
    result["load_average_at_end"] = [part["load_average_at_end"] for part in parts]
    result["combined_from"] = [f"seeds {sorted({r['seed'] for r in part['runs']})}" for part in parts]  # how: the doc says
    order = [*FLOWER_SYSTEMS, *FEDMQ_SYSTEMS]
    names = {r["system"] for r in result["runs"]}
    systems = [n for n in order if n in names] + sorted(names - set(order))
    result["fedmq_systems"] = {k: v for part in full for k, v in part["fedmq_systems"].items()}
    result["summary"] = summarize(result["runs"], systems)
    write(result, out)


if __name__ == "__main__":
    main()
