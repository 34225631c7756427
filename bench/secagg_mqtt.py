"""Secure aggregation over a real mosquitto (issue 15, item 4): round latency and per-agent bytes on the wire.

The real coordinator process (`python -m coordinator --strategy fedbuff --secure-aggregation`,
checkpointing, so every step is committed before it is published) and K agents, each its own
paho client (protocol/transport.make_client, as the agent's session) on its own network thread,
driving the real edge_agent/secagg.py `SecAggClient` exactly as edge_agent/session.py does
(replies published at QoS 1 from the network thread). The agents do not train: each round every
agent holds a fresh random delta of the digits model's 650 parameters and announces its key, so
the cohort forms at once and the round is timed alone.

Per round: `round_ms` is wall-clock from the cohort announcement reaching a watcher client to the
stepped model (the next version, retained) reaching it; `coordinator_round_ms` is the
coordinator's own cohort-to-sum time from its status. Bytes: tcpdump on loopback, every IP packet
(IP + TCP headers, MQTT framing, TCP ACKs) of each agent's connection from its key announcement
to the end of the round, the connection's set-up excluded; payload bytes beside them. Agent CPU:
the thread time of each agent's `SecAggClient` calls (key generation, shares, masking, reveal).
All K agents share this process's interpreter, so their computation runs one after another:
on K separate devices the round would be shorter by up to K - 1 agents' CPU.

    python -m bench.secagg_mqtt                  # K = 5, 10, 20, 50, 5 rounds each
    python -m bench.secagg_mqtt --ks 5,10 --rounds 3

Writes the `mqtt` entry of bench/results/secagg.json (its other entries are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.secagg import N_PARAMS, machine, write  # noqa: E402
from edge_agent.secagg import SecAggClient  # noqa: E402
from protocol.topics import Topics  # noqa: E402
from protocol.transport import BrokerSettings, connect, make_client  # noqa: E402
from simulation.mosquitto import Mosquitto  # noqa: E402
from simulation.secagg_mqtt import StatusWatcher  # noqa: E402


class Capture:
    """tcpdump on loopback for one port, in immediate mode: without it the kernel hands packets over in
    blocks up to a second late, and a capture stopped right after a round holds none of them."""

    def __init__(self, path: Path, port: int) -> None:
        self.path = path
        self.proc = subprocess.Popen(["tcpdump", "-i", "lo", "--immediate-mode", "-U", "-s", "96", "-w", str(path),
                                      f"tcp port {port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        line = self.proc.stderr.readline().decode()
        if "listening" not in line:
            raise RuntimeError(f"tcpdump did not start: {line}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)


def pcap_bytes(path: Path, server_port: int) -> dict[int, dict[str, int]]:
    """IP bytes (the packet's length on the wire less the 14-byte loopback link header) per client port,
    up (to `server_port`) and down; only the headers need to be captured."""
    data = path.read_bytes()
    endian = "<" if struct.unpack("<I", data[:4])[0] in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    link = {1: 14, 113: 16, 0: 4}[struct.unpack(endian + "I", data[20:24])[0]]
    out: dict[int, dict[str, int]] = {}
    pos = 24
    while pos + 16 <= len(data):
        _, _, incl, orig = struct.unpack(endian + "IIII", data[pos:pos + 16])
        ip = data[pos + 16 + link:pos + 16 + incl]
        pos += 16 + incl
        tcp = ip[(ip[0] & 0x0F) * 4:] if ip[0] >> 4 == 4 else ip[40:]
        sport, dport = struct.unpack(">HH", tcp[:4])
        if dport == server_port:
            out.setdefault(sport, {"up": 0, "down": 0})["up"] += orig - link
        elif sport == server_port:
            out.setdefault(dport, {"up": 0, "down": 0})["down"] += orig - link
    return out


class Agent:
    """One agent's paho client and `SecAggClient`, with its payload bytes and CPU counted."""

    def __init__(self, agent_id: str, topics: Topics, settings: BrokerSettings) -> None:
        self.secure = SecAggClient(agent_id, topics)
        self.sent = self.received = 0
        self.cpu = 0.0
        self.lock = threading.Lock()
        self.client = make_client(settings, f"bench-{topics.fleet}-{agent_id}", persistent=False)
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in self.secure.subscriptions])
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        connect(self.client, settings, timeout=10)

    def _on_message(self, client, userdata, msg) -> None:  # as AgentSession._on_message
        if not self.secure.owns(msg.topic):
            return
        t0 = time.thread_time()
        replies = self.secure.on_message(msg.topic, msg.payload)
        with self.lock:
            self.cpu += time.thread_time() - t0
            self.received += len(msg.payload)
        self._publish(replies)

    def _publish(self, messages) -> None:
        for topic, payload, retain in messages:
            with self.lock:
                self.sent += len(payload)
            self.client.publish(topic, payload, qos=1, retain=retain)

    def hold(self, delta: np.ndarray, version: int) -> None:
        t0 = time.thread_time()
        message = self.secure.hold(delta, version)
        with self.lock:
            self.cpu += time.thread_time() - t0
        self._publish([message])

    def take(self) -> tuple[int, int, float]:
        with self.lock:
            out, self.sent, self.received, self.cpu = (self.sent, self.received, self.cpu), 0, 0, 0.0
        return out

    @property
    def port(self) -> int:
        return self.client.socket().getsockname()[1]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Watcher(StatusWatcher):
    """Arrival times of cohorts and models, and the newest coordinator status."""

    def __init__(self, topics: Topics, settings: BrokerSettings) -> None:
        self.cohort_times: list[float] = []
        self.versions: dict[int, float] = {}
        super().__init__(topics, settings)

    def filters(self) -> list[str]:
        return [*super().filters(), self.topics.model]

    def take(self, topic: str, payload: bytes) -> None:
        now = time.monotonic()
        super().take(topic, payload)
        if topic == self.topics.secagg_cohort:
            self.cohort_times.append(now)
        elif topic == self.topics.model and payload:
            from protocol.messages import decode_model

            self.versions.setdefault(decode_model(payload, fleet=self.topics.fleet).version, now)


def run_k(broker: Mosquitto, workdir: Path, k: int, rounds: int, seed: int = 0) -> dict:
    """`rounds` secure-aggregation rounds of a cohort of K through the real coordinator process."""
    topics = Topics(f"sabench{k}")
    settings = BrokerSettings(host=broker.host, port=broker.port)
    log = open(workdir / f"coordinator-{k}.log", "ab")
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "--broker", broker.url, "--fleet", topics.fleet, "--model", "sgd-classifier",
         "--classes", ",".join(map(str, range(10))), "--n-features", "64", "--checkpoint-dir", str(workdir / f"ckpt-{k}"),
         "--strategy", "fedbuff", "--buffer-size", str(k), "--secure-aggregation", "--secagg-timeout", "60",
         "--publish-interval", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    watcher = Watcher(topics, settings)
    agents = [Agent(f"a{i:02d}", topics, settings) for i in range(k)]
    rng = np.random.default_rng(seed)
    rows = []
    try:
        for a in agents:
            assert a.subscribed.wait(10), "an agent could not subscribe"
        watcher.wait(lambda: 0 in watcher.versions, 60, "the coordinator's first model")
        for r in range(rounds):
            version = r + 1
            capture = Capture(workdir / f"k{k}-r{r}.pcap", broker.port)
            for a in agents:
                a.hold(rng.normal(0, 0.1, N_PARAMS), version - 1)
            watcher.wait(lambda: len(watcher.cohort_times) > r, 120, f"cohort {r}")
            watcher.wait(lambda: version in watcher.versions and
                         (watcher.status.get("secure_aggregation") or {}).get("completed", 0) >= version, 120,
                         f"round {r} stepped the model")
            time.sleep(0.2)  # the last TCP ACKs (delayed ACK) reach the capture; no event marks them
            capture.stop()
            wire = pcap_bytes(capture.path, broker.port)
            per = [(a.take(), wire.get(a.port, {})) for a in agents]
            sec = watcher.status["secure_aggregation"]
            assert sec["aborted"] == {} and watcher.status["accepted"] == k * version, watcher.status
            rows.append({
                "round_ms": (watcher.versions[version] - watcher.cohort_times[r]) * 1e3,
                "coordinator_round_ms": sec["last_round_seconds"] * 1e3,
                "up": statistics.median(w.get("up", 0) for _, w in per),
                "down": statistics.median(w.get("down", 0) for _, w in per),
                "payload_sent": statistics.median(s for (s, _, _), _ in per),
                "payload_received": statistics.median(rcv for (_, rcv, _), _ in per),
                "cpu_ms": statistics.median(c for (_, _, c), _ in per) * 1e3,
            })
            print(f"K={k} round {r}: {rows[-1]}", file=sys.stderr)
    finally:
        for a in agents:
            a.close()
        watcher.close()
        coordinator.terminate()
        coordinator.wait(30)
        log.close()
    med = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    return {"k": k, "threshold": k // 2 + 1, "n_params": N_PARAMS, "rounds": rounds,
            "round_ms": round(med["round_ms"], 1), "round_ms_max": round(max(r["round_ms"] for r in rows), 1),
            "coordinator_round_ms": round(med["coordinator_round_ms"], 1),
            "agent_ip_bytes_up": int(med["up"]), "agent_ip_bytes_down": int(med["down"]),
            "agent_payload_bytes_sent": int(med["payload_sent"]), "agent_payload_bytes_received": int(med["payload_received"]),
            "agent_cpu_ms": round(med["cpu_ms"], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", default="5,10,20,50", help="cohort sizes K, comma-separated")
    p.add_argument("--rounds", type=int, default=5, help="rounds per K (medians)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="secagg-mqtt-") as tmp:
        workdir = Path(tmp)
        broker = Mosquitto(workdir / "broker")
        broker.start()
        try:
            results = [run_k(broker, workdir, int(k), args.rounds) for k in args.ks.split(",")]
        finally:
            broker.stop()
    update = {"mqtt": {
        "machine": machine(),
        "method": "real mosquitto, the real coordinator process (fedbuff, --secure-aggregation, checkpointing), K paho "
                  "clients in one process driving edge_agent/secagg.py (no training: a fresh random delta per round); "
                  "round_ms from the cohort reaching a watcher to the stepped model reaching it; bytes by tcpdump on lo "
                  f"(IP packets of each agent's connection, key announcement to step); medians of {args.rounds} rounds",
        "results": results}}
    print(json.dumps(update, indent=1))
    write(update)


if __name__ == "__main__":
    main()
