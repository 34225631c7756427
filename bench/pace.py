"""Pace steering benchmark: the fleet's update rate and model downloads against fleet size,
with and without --target-updates-per-s. Real mosquitto, a real coordinator process (fedasync,
default --publish-interval 1), real agents (edge_agent Agent + AgentSession, one MQTT client
each, in this process's threads) training on digits.

    python bench/pace.py [--agents 4,8,16,32] [--target 4] [--out bench/results/pace.json]
    python bench/pace.py --tier [--agents 25,50,100] [--target 5] [--out bench/results/pace_tier.json]

Per fleet size and mode: updates/s the coordinator accepted and model messages/s (and bytes/s)
the broker delivered to the agents, over a window after the fleet settled (every agent sent,
then one and a half report intervals so each holds the current pace).
With --tier the same agents speak MQTT 3.1.1 to a 3-node NATS cluster (tier/cluster.py) with one
partition worker and the tier's root (tier/root.py, fedbuff, its defaults) steering; the updates
are those the root folded (its audit log), and a steered window starts once the root's status
counts every agent online and each has sent an update trained on a model carrying that pace.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from edge_agent.agent import Agent  # noqa: E402
from edge_agent.data import ArraySource  # noqa: E402
from edge_agent.session import AgentSession  # noqa: E402
from edge_agent.trainer import LocalTrainer  # noqa: E402
from protocol.pace import steer  # noqa: E402
from protocol.topics import Topics  # noqa: E402
from protocol.transport import BrokerSettings  # noqa: E402
from simulation.datasets import load_dataset  # noqa: E402
from simulation.mosquitto import Mosquitto  # noqa: E402
from tier.cluster import NatsCluster  # noqa: E402
from tier.mqtt_link import Link, parse_urls  # noqa: E402

FLEET = "pacebench"
ROWS = 40  # per agent


class Counter:
    """Counts of what crossed the broker: updates (a watcher's subscription) and the agents' model messages."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.updates = 0
        self.models = 0
        self.model_bytes = 0
        self.senders: set[str] = set()

    def snapshot(self) -> tuple[int, int, int]:
        with self.lock:
            return self.updates, self.models, self.model_bytes


def watch_updates(port: int, topics: Topics, counter: Counter) -> mqtt.Client:
    """A subscriber to every update: counts them and who sent them."""
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pace-watch-{os.getpid()}")

    def on_message(client, userdata, msg):
        with counter.lock:
            counter.updates += 1
            counter.senders.add(topics.agent_of_update(msg.topic))

    client.on_connect = lambda c, *a: c.subscribe(topics.all_updates, qos=1)
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    if not subscribed.wait(20):
        raise RuntimeError("the update watcher could not subscribe")
    return client


def start_agent(i: int, ds, settings: BrokerSettings, topics: Topics, counter: Counter,
                stop: threading.Event) -> threading.Thread:
    """One real agent on its own MQTT connection; its model messages are counted as they arrive."""
    rows = slice(i * ROWS % (len(ds.y_train) - ROWS), i * ROWS % (len(ds.y_train) - ROWS) + ROWS)
    agent = Agent(f"agent{i}", topics, ArraySource(ds.X_train[rows], ds.y_train[rows]),
                  LocalTrainer(random_state=i), "int8", seed=i)
    session = AgentSession(agent, settings, status_interval=0)
    take = session.client.on_message

    def counted(client, userdata, msg):
        if msg.topic == topics.model:
            with counter.lock:
                counter.models += 1
                counter.model_bytes += len(msg.payload)
        take(client, userdata, msg)

    session.client.on_message = counted
    thread = threading.Thread(target=session.run, args=(stop,), daemon=True)
    thread.start()
    return thread


def run(n: int, target: float, workdir: Path, ds) -> dict:
    """One fleet of `n` agents, steered to `target` updates/s (0: unsteered); its rates."""
    topics = Topics(FLEET)
    counter, stop = Counter(), threading.Event()
    with Mosquitto(workdir / f"broker-{n}-{target}") as broker:
        steering = ["--target-updates-per-s", str(target)] if target else []
        log = open(workdir / f"coordinator-{n}-{target}.log", "ab")
        coordinator = subprocess.Popen(
            [sys.executable, "-m", "coordinator", "--broker", broker.url, "--fleet", FLEET, "--model", "sgd-classifier",
             "--classes", ",".join(map(str, ds.classes)), "--n-features", str(ds.n_features), "--strategy", "fedasync",
             "--max-staleness", "1000", *steering],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        watcher = watch_updates(broker.port, topics, counter)
        threads = []
        try:
            threads = [start_agent(i, ds, BrokerSettings("127.0.0.1", broker.port), topics, counter, stop)
                       for i in range(n)]
            deadline = time.monotonic() + 120
            while len(counter.senders) < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {len(counter.senders)} of {n} agents sent an update in 120 s")
                time.sleep(0.2)
            interval = steer(n, target).interval if target else 1.0
            time.sleep(1.5 * interval)  # every agent holds a model carrying this fleet's pace
            window = max(10.0, 2.5 * interval)
            before, t0 = counter.snapshot(), time.monotonic()
            time.sleep(window)
            after, elapsed = counter.snapshot(), time.monotonic() - t0
        finally:
            stop.set()
            for thread in threads:
                thread.join(15)
            watcher.loop_stop()
            watcher.disconnect()
            coordinator.terminate()
            coordinator.wait(20)
    updates, models, model_bytes = (b - a for a, b in zip(before, after))
    return {"agents": n, "steered": bool(target), "target_updates_per_s": target or None,
            "report_interval_s": round(interval, 3) if target else None, "window_s": round(elapsed, 1),
            "updates_per_s": round(updates / elapsed, 2), "model_downloads_per_s": round(models / elapsed, 2),
            "model_kib_per_s": round(model_bytes / elapsed / 1024, 1)}


TIER_PARTITIONS = 4


def _audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        time.sleep(0.2)  # polling files other processes write and a dict a paho thread sets


def run_tier(n: int, target: float, workdir: Path, ds) -> dict:
    """`run` through the scale-out tier: the root steers (0: not), its audit log counts the folded updates."""
    topics = Topics(FLEET)
    counter, stop = Counter(), threading.Event()
    audit = workdir / f"audit-{n}-{target}.jsonl"
    status: dict = {}
    with NatsCluster(workdir / f"nats-{n}-{target}", 3, TIER_PARTITIONS) as cluster:
        common = ["--nats", ",".join(cluster.nats_urls), "--mqtt", ",".join(cluster.mqtt_urls), "--fleet", FLEET,
                  "--partitions", str(TIER_PARTITIONS), "--log-level", "WARNING"]
        steering = ["--target-updates-per-s", str(target)] if target else []
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        log = open(workdir / f"tier-{n}-{target}.log", "ab")
        procs = [subprocess.Popen([sys.executable, "-m", module, *common, *extra], cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT, env=env)
                 for module, extra in (("tier.worker", ["--id", "w1", "--max-staleness", "1000"]),
                                       ("tier.root", ["--id", "r1", "--model", "sgd-classifier", "--n-features",
                                                      str(ds.n_features), "--classes", ",".join(map(str, ds.classes)),
                                                      "--audit-log", str(audit), *steering]))]
        nodes = parse_urls(cluster.mqtt_urls)
        watch = Link(nodes, f"pace-watch-{os.getpid()}", persistent=False,
                     on_message=lambda c, u, msg: status.update(json.loads(msg.payload)),
                     on_connect=lambda c, *a: c.subscribe(topics.coordinator_status, 0))
        watch.start()
        threads = []
        try:
            _until(lambda: "version" in status, 120, "the root's first model")
            threads = [start_agent(i, ds, nodes[i % len(nodes)], topics, counter, stop) for i in range(n)]
            heard = lambda: len({r["agent"] for r in _audit(audit)})  # noqa: E731
            try:
                _until(lambda: heard() == n, 240, f"an update folded from each of {n} agents")
            except RuntimeError:
                if target:
                    raise
                # unsteered, a large fleet can saturate this machine (every agent trains on every model): measured
                # as it is, with how many agents had been heard (`agents_folded`)
            agents_folded = heard()
            interval = steer(n, target).interval if target else 1.0
            if target:  # every agent counted, and each on a model that carries this fleet's pace
                _until(lambda: (status.get("pace") or {}).get("agents_online") == n, 60, f"{n} agents online")
                steered_at = status["version"]
                _until(lambda: len({r["agent"] for r in _audit(audit) if r["base"] >= steered_at}) == n,
                       3 * interval + 60, "an update from each agent on a steered model")
            else:
                time.sleep(3.0)  # settled after the last agent's first update
            window = max(10.0, 2.5 * interval)
            before, start = counter.snapshot(), time.time()
            time.sleep(window)
            after, end = counter.snapshot(), time.time()
            _until(lambda: any(r["t"] >= end for r in _audit(audit)), 30, "the window folded")
            folded = sum(1 for r in _audit(audit) if start <= r["t"] < end)
            pace = status.get("pace")
        finally:
            stop.set()
            for thread in threads:
                thread.join(15)
            watch.close()
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log.close()
    elapsed = end - start
    _, models, model_bytes = (b - a for a, b in zip(before, after))
    return {"agents": n, "steered": bool(target), "target_updates_per_s": target or None,
            "report_interval_s": round(interval, 3) if target else None,
            "agents_online": pace["agents_online"] if pace else None, "agents_folded": agents_folded,
            "window_s": round(elapsed, 1),
            "updates_per_s": round(folded / elapsed, 2), "model_downloads_per_s": round(models / elapsed, 2),
            "model_kib_per_s": round(model_bytes / elapsed / 1024, 1), "load_avg_1m": round(os.getloadavg()[0], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", default="4,8,16,32", help="fleet sizes, comma-separated")
    ap.add_argument("--target", type=float, default=4.0, help="--target-updates-per-s of the steered runs")
    ap.add_argument("--tier", action="store_true",
                    help="through the scale-out tier (3 NATS nodes, one worker, the root steering) instead of "
                         "mosquitto and one coordinator")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    ds = load_dataset("digits", seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.agents.split(",")]:
            for target in (0.0, args.target):
                rows.append((run_tier if args.tier else run)(n, target, Path(tmp), ds))
                print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "pace_tier" if args.tier else "pace", "command": "python bench/pace.py " + " ".join(sys.argv[1:]),
              "cpus": os.cpu_count(), "dataset": "digits", "rows_per_agent": ROWS, "runs": rows}
    result.update({"strategy": "fedbuff", "buffer_size": 5, "publish_interval_s": 0.2, "nats_nodes": 3,
                   "partitions": TIER_PARTITIONS, "workers": 1} if args.tier else
                  {"strategy": "fedasync", "publish_interval_s": 1.0})
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
