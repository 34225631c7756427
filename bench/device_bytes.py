"""Device bytes and CPU: what one device pays per round in fedmq and in Flower, measured in one run.

The digits fleet: 20 agents, one process each, standardized digits dealt into 20 stratified
shards, one local epoch per update; 400 updates in all. Each fedmq configuration (model
codec, update codec, --min-model-interval) runs against a real mosquitto and coordinator
(fedasync at its default --publish-interval); Flower 1.41 runs the identical task
(bench/flower_baseline.py: FedAvg over the 20 clients for 20 rounds) from a separate venv, so
flwr never enters fedmq's dependencies, twice: sending float64 (NumPyClient's default for
scikit-learn's coefficients) and cast to float32.

Bytes: tcpdump on loopback, every IP packet of each device's connection (IPv4 + TCP headers
+ payload: MQTT or gRPC/HTTP2 framing and TCP ACKs included; loopback's 14-byte link header
is not), from connect to goodbye, divided by the updates that device sent. CPU per update:
user + system of each device process (/proc), over the same windows for both systems: from
its 1st update to its last, and from its 2nd to its last (each update marked by the first
50 ms sample that saw it), so the CPU a process spends after its last update (Flower's client
tearing down its run) is reported apart, not per update. Accuracy: for fedmq the retained
model as devices decode it (int8/int4 values), for Flower its global model. RSS: the peak
(VmHWM). Writes bench/results/device_bytes.json.

    python bench/device_bytes.py [--flower-python .flwr-venv/bin/python] [--large no]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
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

from protocol.tabular import write_csv  # noqa: E402
from protocol.topics import Topics  # noqa: E402
from simulation.datasets import load_dataset, standardise  # noqa: E402
from simulation.mosquitto import Mosquitto, free_port  # noqa: E402

AGENTS = 20
UPDATES = 400
TICK = os.sysconf("SC_CLK_TCK")
FLOWER_PYTHON = str(ROOT / ".flwr-venv" / "bin" / "python")
FLOWER_DTYPES = ("float64", "float32")  # what Flower's NumPyClient sends by default, and cast to fedmq's float32
BIG_CLASSES, BIG_FEATURES = 100, 10_000
BIG_AGENTS, BIG_UPDATES = 4, 20
PACKET_LIMIT = 131072  # AWS IoT Core's 128 KB


@dataclass(frozen=True)
class Task:
    """A fleet's data and model: the shards agent<i>.csv and test.csv in `data`."""

    name: str
    data: Path
    n_features: int
    classes: int
    agents: int
    updates: int
    max_packet_bytes: int | None = None  # mosquitto's max_packet_size and both sides' --max-packet-bytes
    publish_interval: float | None = None  # the coordinator's --publish-interval; None: its default


def write_big_task(workdir: Path, agents: int, rows: int = 200, seed: int = 0) -> None:
    """100 classes x 10,000 sparse binary features (a feature per class makes it learnable):
    a 1,000,100-parameter sgd-classifier, as in tests/test_chunked_e2e.py."""
    rng = np.random.default_rng(seed)
    workdir.mkdir(exist_ok=True)
    for name, n in [*((f"agent{i}", rows) for i in range(agents)), ("test", 500)]:
        y = rng.integers(0, BIG_CLASSES, n)
        X = (rng.random((n, BIG_FEATURES)) < 0.01).astype(np.float32)
        X[np.arange(n), y] = 1.0
        write_csv(workdir / f"{name}.csv", X, y)


def write_task(workdir: Path, agents: int, seed: int = 0) -> int:
    """Standardized digits: agent<i>.csv shards (stratified, dealt like cards) and test.csv; returns n_features."""
    ds = load_dataset("digits", seed=seed)
    X_train, X_test = standardise(ds.X_train, ds.X_test)
    order = np.random.default_rng(seed).permutation(len(ds.y_train))
    order = order[np.argsort(ds.y_train[order], kind="stable")]
    for i in range(agents):
        part = order[i::agents]
        write_csv(workdir / f"agent{i}.csv", X_train[part], ds.y_train[part])
    write_csv(workdir / "test.csv", X_test, ds.y_test)
    return X_train.shape[1]


@dataclass
class Device:
    """One device process and what was sampled of it.

    `marks[n]` is the process's CPU at the first sample that saw its n-th update, read the
    same way for fedmq and Flower: the CPU windows between two marks are the only CPU
    figures, so nothing a process spends after its last update (Flower's client waits for
    and tears down its run) enters a per-update figure.
    """

    proc: subprocess.Popen
    log: Path
    pattern: str  # a line per update in its log
    marks: dict[int, float] = field(default_factory=dict)  # updates so far -> CPU seconds when first seen
    cpu_end: float = 0.0  # the newest CPU reading (the whole life of the process when it is done)
    hwm_kb: int = 0
    port: int | None = None
    updates: int = 0
    _read: int = 0  # bytes of the log already counted

    def sample(self) -> None:
        """Read updates (new log lines), CPU (utime + stime) and peak RSS of the live process."""
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICK
        hwm = re.search(r"VmHWM:\s+(\d+)", status)
        self.hwm_kb = max(self.hwm_kb, int(hwm.group(1)) if hwm else 0)
        with open(self.log, "rb") as fh:
            fh.seek(self._read)
            new = fh.read()
        cut = new.rfind(b"\n") + 1  # whole lines only
        self._read += cut
        self.updates += new[:cut].decode(errors="replace").count(self.pattern)
        self.marks.setdefault(self.updates, cpu)
        self.cpu_end = cpu


CPU_WINDOWS = {"first_to_last": 1, "second_to_last": 2}  # window name -> the update it starts at


def cpu_window(marks: dict[int, float], start: int) -> tuple[float, int]:
    """CPU seconds and updates from update `start` to the last update (both as first seen; when
    two updates fell between samples, from the first mark after `start`)."""
    last = max(marks, default=0)
    first = min((n for n in marks if n >= start), default=last)
    if last <= first:
        return 0.0, 0
    return marks[last] - marks[first], last - first


def cpu_figures(devices: list["Device"]) -> dict:
    """Per-update CPU over each window of CPU_WINDOWS (the same for every system measured),
    and the CPU after the last update (not per update: it is the run's wind-down)."""
    out = {}
    for name, start in CPU_WINDOWS.items():
        spans = [cpu_window(d.marks, start) for d in devices]
        cpu, counted = sum(s[0] for s in spans), sum(s[1] for s in spans)
        out[name] = round(1000 * cpu / counted, 2) if counted else None
    tails = [d.cpu_end - d.marks[max(d.marks)] for d in devices if d.marks]
    return {"cpu_ms_per_update": out,
            "cpu_ms_after_last_update": round(1000 * float(np.mean(tails)), 1) if tails else None}


class Capture:
    """tcpdump on loopback for one TCP port, written to a pcap."""

    def __init__(self, path: Path, port: int) -> None:
        self.path = path
        if shutil.which("tcpdump") is None:
            raise SystemExit("device bytes are counted with tcpdump, which is not installed: apt-get install tcpdump")
        self.proc = subprocess.Popen(["tcpdump", "-i", "lo", "-U", "-s", "0", "-B", "65536", "-w", str(path), f"tcp port {port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        line = self.proc.stderr.readline().decode()  # "listening on lo, ..." once it captures
        if "listening" not in line:
            raise RuntimeError(f"tcpdump did not start: {line}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)


def pcap_bytes(path: Path, server_port: int, mqtt: bool = True) -> dict[int, dict]:
    """IP bytes and packets per client port, up (to the server port) and down, and where they go.

    "kinds" splits each direction's bytes exactly: the IP/TCP headers of segments carrying
    data, TCP-only segments (ACKs, SYN, FIN) whole, and the payload, which for MQTT is the
    stream reassembled by sequence number and cut into its MQTT packets (a PUBLISH named by
    its topic); for gRPC (Flower) the payload is one kind.
    """
    data = path.read_bytes()
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    link = {1: 14, 113: 16, 0: 4}[linktype]  # Ethernet (lo), Linux cooked, BSD loopback
    out: dict[int, dict] = {}
    streams: dict[tuple[int, str], list] = {}  # (port, dir) -> [next seq, bytearray, payload bytes seen]
    pos = 24
    while pos + 16 <= len(data):
        _, _, incl, orig = struct.unpack(endian + "IIII", data[pos:pos + 16])
        frame = data[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        ip = frame[link:]
        version = ip[0] >> 4
        if version == 4:
            ihl = (ip[0] & 0x0F) * 4
        elif version == 6:
            ihl = 40
        else:
            continue
        tcp = ip[ihl:]
        sport, dport = struct.unpack(">HH", tcp[:4])
        seq = struct.unpack(">I", tcp[4:8])[0]
        flags = tcp[13]
        thl = (tcp[12] >> 4) * 4
        size = orig - link
        payload_len = size - ihl - thl
        if dport == server_port:
            port, key = sport, "up"
        elif sport == server_port:
            port, key = dport, "down"
        else:
            continue
        entry = out.setdefault(port, {"up": 0, "down": 0, "up_packets": 0, "down_packets": 0, "kinds": {}})
        entry[key] += size
        entry[key + "_packets"] += 1
        kinds = entry["kinds"]
        stream = streams.setdefault((port, key), [None, bytearray(), 0])
        if flags & 0x02:  # SYN: the stream starts after it
            stream[0] = (seq + 1) & 0xFFFFFFFF
        if payload_len <= 0:
            _add(kinds, f"{key} TCP-only segments (ACK, SYN, FIN)", size)
            continue
        _add(kinds, f"{key} IP/TCP headers of data segments", size - payload_len)
        stream[2] += payload_len
        if not mqtt:
            continue
        body = tcp[thl:thl + payload_len]
        if len(body) < payload_len:
            raise RuntimeError("capture truncated a segment: tcpdump must capture whole packets (-s 0)")
        if stream[0] is None:
            stream[0] = seq
        skip = (stream[0] - seq) & 0xFFFFFFFF
        if skip < payload_len:  # new bytes (loopback does not reorder; a retransmission is skipped)
            stream[1] += body[skip:]
            stream[0] = (seq + payload_len) & 0xFFFFFFFF
    for (port, key), (_, raw, seen) in streams.items():
        kinds, headers = out[port]["kinds"], out[port].setdefault("publish_headers", {})
        parsed = mqtt_packets(bytes(raw)) if mqtt else []
        for kind, nbytes, header in parsed:
            _add(kinds, f"{key} {kind}", nbytes)
            if kind.startswith("PUBLISH"):
                _add(headers, f"{key} {kind}", header)
        if seen > len(raw):  # gRPC (not parsed), or segments after a gap in the capture
            _add(kinds, f"{key} {'payload (gRPC over HTTP/2)' if not mqtt else 'payload not reassembled'}",
                 seen - len(raw))
    return out


def _add(kinds: dict, kind: str, nbytes: int) -> None:
    k = kinds.setdefault(kind, [0, 0])
    k[0] += nbytes
    k[1] += 1


MQTT_TYPES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 8: "SUBSCRIBE", 9: "SUBACK",
              10: "UNSUBSCRIBE", 11: "UNSUBACK", 12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT"}


def mqtt_packets(raw: bytes) -> list[tuple[str, int, int]]:
    """(kind, bytes, header bytes) of each MQTT 3.1.1 packet in one direction's stream: the type, and for a
    PUBLISH its topic's kind (fedmq/<fleet>/<kind>/..., '-chunk' for chunk topics, 'agent' the agent's
    status); a PUBLISH's header is all but its payload (fixed header, topic, packet id at QoS > 0)."""
    out, pos = [], 0
    while pos < len(raw):
        start, mult, rem = pos, 1, 0
        pos += 1
        while pos < len(raw):
            rem += (raw[pos] & 0x7F) * mult
            mult *= 128
            pos += 1
            if not raw[pos - 1] & 0x80:
                break
        kind = MQTT_TYPES.get(raw[start] >> 4, "other")
        end = min(len(raw), pos + rem)
        header = end - start
        if kind == "PUBLISH" and pos + 2 <= len(raw):
            tlen = struct.unpack(">H", raw[pos:pos + 2])[0]
            topic = raw[pos + 2:pos + 2 + tlen].decode(errors="replace").split("/")
            if len(topic) >= 3:
                kind = f"PUBLISH {topic[2]}{'-chunk' if 'chunk' in topic[3:] else ''}"
            header = min(header, pos - start + 2 + tlen + (2 if (raw[start] >> 1) & 3 else 0))
        out.append((kind, end - start, header))
        pos = end
    return out


def client_ports(pids: set[int], server_port: int) -> dict[int, int]:
    """pid -> local port of its TCP connection to `server_port` (ss)."""
    out: dict[int, int] = {}
    text = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True).stdout
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 6 or not parts[4].endswith(f":{server_port}"):
            continue
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in pids:
                out[pid] = int(parts[3].rsplit(":", 1)[1])
    return out


def spawn(argv: list, log: Path, env: dict | None = None) -> subprocess.Popen:
    """A process with its output in `log`."""
    fh = open(log, "ab")
    return subprocess.Popen([str(a) for a in argv], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})})


def measure(devices: list[Device], server_port: int, capture: Capture, done, timeout: float) -> dict:
    """Sample the devices until done() or timeout; then the bytes of their connections."""
    pids = {d.proc.pid: d for d in devices}
    deadline = time.monotonic() + timeout
    ports_at = 0.0
    while time.monotonic() < deadline:
        for d in devices:
            d.sample()
        missing = {pid for pid, d in pids.items() if d.port is None}
        if missing and time.monotonic() - ports_at > 0.5:  # ss reads all of /proc: not at every sample
            ports_at = time.monotonic()
            for pid, port in client_ports(missing, server_port).items():
                pids[pid].port = port
        if done():
            break
        time.sleep(0.05)  # sampling /proc: there is no event to wait on
    else:
        raise RuntimeError("the run did not finish in time")
    for d in devices:
        d.sample()
    return {}


def summarize(devices: list[Device], wire: dict[int, dict[str, int]]) -> dict:
    """Per-device means: bytes per update up and down, CPU per update, peak RSS."""
    ups, downs, packets, updates = [], [], [], []
    for d in devices:
        if d.port is None or d.port not in wire or d.updates == 0:
            raise RuntimeError(f"no connection or no update seen for pid {d.proc.pid}")
        w = wire[d.port]
        ups.append(w["up"] / d.updates)
        downs.append(w["down"] / d.updates)
        packets.append((w["up_packets"] + w["down_packets"]) / d.updates)
        updates.append(d.updates)
    kinds: dict[str, list[float]] = {}
    for d in devices:
        for kind, (size, count) in wire[d.port].get("kinds", {}).items():
            k = kinds.setdefault(kind, [0.0, 0.0])
            k[0] += size / d.updates / len(devices)
            k[1] += count / d.updates / len(devices)
    return {
        "updates_per_device": round(float(np.mean(updates)), 2),
        "up_bytes_per_round": round(float(np.mean(ups)), 1),
        "down_bytes_per_round": round(float(np.mean(downs)), 1),
        "total_bytes_per_round": round(float(np.mean(ups) + np.mean(downs)), 1),
        "packets_per_round": round(float(np.mean(packets)), 2),
        **cpu_figures(devices),
        "rss_mb": round(float(np.mean([d.hwm_kb for d in devices])) / 1024, 1),
        "breakdown": {k: {"bytes_per_round": round(v[0], 1), "packets_per_round": round(v[1], 3)}
                      for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][0])},
    }


def run_fedmq(workdir: Path, task: Task, *, model_codec: str | None, codec: str, interval: float) -> dict:
    """One fedmq configuration over mosquitto; returns the device figures and the accuracy."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    agents, updates = task.agents, task.updates
    name = f"{task.name}-mc-{model_codec or 'none'}-{codec.replace(':', '').replace('+', '')}-{interval:g}"
    run_dir = workdir / name
    run_dir.mkdir()
    limit = task.max_packet_bytes
    broker = Mosquitto(run_dir / "broker", extra_conf=f"max_packet_size {limit}" if limit else "")
    broker.start()
    topics = Topics("bytes")
    state: dict = {"status": {}, "agent_status": {}}

    def on_message(client, userdata, msg):
        if msg.topic == topics.coordinator_status:
            state["status"] = json.loads(msg.payload)
        elif msg.payload:
            state["agent_status"].setdefault(msg.topic, []).append(len(msg.payload) + len(msg.topic))

    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{os.getpid()}")
    watcher.on_message = on_message
    watcher.connect(broker.host, broker.port)
    watcher.subscribe([(topics.coordinator_status, 0), (f"{topics.base}/agent/+/status", 1)])
    watcher.loop_start()
    capture = Capture(run_dir / "capture.pcap", broker.port)
    coordinator_args = ["--broker", broker.url, "--fleet", topics.fleet, "--model", "sgd-classifier",
                        "--n-features", task.n_features, "--classes", ",".join(map(str, range(task.classes))),
                        "--eval-csv", task.data / "test.csv",
                        "--publish-policy", "clock"]  # as bench/results/device_bytes.json was measured (before issue 23)
    if task.publish_interval is not None:
        coordinator_args += ["--publish-interval", task.publish_interval]
    if limit:
        coordinator_args += ["--max-packet-bytes", limit]
    if model_codec is not None:
        coordinator_args += ["--model-codec", model_codec]
    coordinator = spawn([sys.executable, "-m", "coordinator", *coordinator_args], run_dir / "coordinator.log")
    devices = []
    try:
        for i in range(agents):
            log = run_dir / f"agent{i}.log"
            argv = [sys.executable, "-m", "edge_agent", "--broker", broker.url, "--fleet", topics.fleet,
                    "--id", f"agent{i}", "--data", task.data / f"agent{i}.csv", "--codec", codec, "--seed", i,
                    "--poll-interval", "0.2"]
            if limit:
                argv += ["--max-packet-bytes", limit]
            if interval:
                argv += ["--min-model-interval", interval]
            devices.append(Device(spawn(argv, log), log, "sent update:"))
        measure(devices, broker.port, capture, lambda: (state["status"].get("accepted") or 0) >= updates, 600)
        status = dict(state["status"])
    finally:
        for d in devices:
            d.proc.send_signal(signal.SIGTERM)
        for d in devices:
            d.proc.wait(30)
        coordinator.send_signal(signal.SIGTERM)
        coordinator.wait(30)
        time.sleep(0.5)  # the last FIN/ACK reach the capture buffer
        capture.stop()
        watcher.loop_stop()
        watcher.disconnect()
        try:
            held = device_accuracy(broker, topics, task.data / "test.csv")
        finally:
            broker.stop()
    figures = summarize(devices, pcap_bytes(capture.path, broker.port))
    statuses = [n for topic, n in state["agent_status"].items()]
    figures.update({
        "task": task.name, "max_packet_bytes": limit,
        "model_codec": model_codec or "float32 (no --model-codec in this coordinator)",
        "codec": codec, "min_model_interval": interval,
        "accuracy": held["accuracy"], "accuracy_of": f"the retained model as devices decode it (version {held['version']})",
        "coordinator_accuracy": status.get("accuracy"), "accepted": status.get("accepted"),
        "status_messages_per_device": round(float(np.mean([len(s) for s in statuses])), 2),
        "status_bytes_per_message": round(float(np.mean([np.mean(s) for s in statuses])), 1),
    })
    figures["status_messages_per_round"] = round(figures["status_messages_per_device"] / figures["updates_per_device"], 3)
    return figures


def device_accuracy(broker: Mosquitto, topics: Topics, test_csv: Path, timeout: float = 30.0) -> dict:
    """Accuracy of the retained model (whole or chunked) decoded as a device decodes it: the
    int8/int4 values devices hold, not the coordinator's float64 model."""
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from coordinator.evaluation import score
    from edge_agent.chunks import ModelChunks
    from protocol.messages import decode_model
    from protocol.tabular import load_csv

    chunks, got, done = ModelChunks(topics, max_bytes=64 * 2**20), {}, threading.Event()

    def on_message(client, userdata, msg):
        payload = chunks.on_message(msg.topic, msg.payload)
        if payload is not None and not done.is_set():
            got["model"] = decode_model(payload, fleet=topics.fleet, max_bytes=64 * 2**20)
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-held-{os.getpid()}")
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.subscribe([(topics.model, 1), (topics.all_model_chunks, 1)])
    client.loop_start()
    try:
        if not done.wait(timeout):
            raise RuntimeError("no retained model to score")
    finally:
        client.loop_stop()
        client.disconnect()
    model = got["model"]
    X, y = load_csv(test_csv)
    return {"version": model.version, "accuracy": score(model.spec, model.params, X, y)["accuracy"]}


def run_flower(workdir: Path, python: str, task: Task, dtype: str = "float64") -> dict:
    """Flower 1.41 on the same shards, parameters in `dtype` both ways; the device figures and the final accuracy."""
    agents, rounds = task.agents, task.updates // task.agents
    run_dir = workdir / f"flower-{task.name}-{dtype}"
    run_dir.mkdir()
    port = free_port()
    capture = Capture(run_dir / "capture.pcap", port)
    address = f"127.0.0.1:{port}"
    script = ROOT / "bench" / "flower_baseline.py"
    server = spawn([python, script, "server", "--address", address, "--data", task.data, "--clients", agents,
                    "--rounds", rounds, "--classes", task.classes, "--dtype", dtype], run_dir / "server.log")
    devices = []
    try:
        time.sleep(3)  # flwr's server imports for seconds before it listens; clients retry anyway
        for i in range(agents):
            log = run_dir / f"client{i}.log"
            devices.append(Device(spawn([python, script, "client", "--address", address, "--data", task.data,
                                         "--index", i, "--classes", task.classes, "--dtype", dtype], log), log, "fit "))
        measure(devices, port, capture, lambda: server.poll() is not None, 600)
        for d in devices:
            d.proc.wait(30)
    finally:
        for p in [d.proc for d in devices] + [server]:
            if p.poll() is None:
                p.kill()
        time.sleep(0.5)
        capture.stop()
    figures = summarize(devices, pcap_bytes(capture.path, port, mqtt=False))
    from bench.async_advantage import flower_timeline  # here: async_advantage imports this module

    timeline = flower_timeline((run_dir / "server.log").read_text(), agents)
    import importlib.metadata  # noqa: F401  (version from the venv that ran it)
    version = subprocess.run([python, "-c", "import flwr; print(flwr.__version__)"], capture_output=True,
                             text=True).stdout.strip()
    figures.update({"flwr": version, "dtype": dtype, "rounds": rounds, "accuracy": timeline[-1][1] if timeline else None})
    return figures


def versus_flower(row: dict, flowers: dict[str, dict]) -> dict:
    """A fedmq row against Flower: bytes for each dtype Flower sent, CPU per window, accuracy points."""
    out = {}
    for dtype, flower in flowers.items():
        suffix = "" if dtype == "float64" else f"_{dtype}"
        out[f"bytes_ratio_vs_flower{suffix}"] = round(flower["total_bytes_per_round"] / row["total_bytes_per_round"], 2)
        out[f"cpu_ratio_vs_flower{suffix}"] = {
            w: round(row["cpu_ms_per_update"][w] / flower["cpu_ms_per_update"][w], 2)
            for w in CPU_WINDOWS if row["cpu_ms_per_update"][w] and flower["cpu_ms_per_update"][w]}
        out[f"accuracy_points_vs_flower{suffix}"] = round(100 * (row["accuracy"] - flower["accuracy"]), 2)
    return out


def supported_model_codecs() -> list[str] | None:
    """The coordinator's --model-codec choices, or None when it has no such flag."""
    text = subprocess.run([sys.executable, "-m", "coordinator", "--help"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}).stdout
    match = re.search(r"--model-codec \{([^}]*)\}", text)
    return match.group(1).split(",") if match else None


def main() -> None:
    """Run every configuration and Flower; print and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flower-python", default=FLOWER_PYTHON, help="a Python with flwr 1.41 and scikit-learn")
    p.add_argument("--agents", type=int, default=AGENTS)
    p.add_argument("--updates", type=int, default=UPDATES)
    p.add_argument("--interval", type=float, default=1.0, help="--min-model-interval of the fewer-wake-ups rows")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "device_bytes.json")
    p.add_argument("--config", action="append", default=[], metavar="MODEL_CODEC,CODEC,INTERVAL",
                   help="run only these fedmq configurations (repeatable), e.g. int8,int4,0")
    p.add_argument("--no-flower", action="store_true", help="skip Flower (a quick look, not a result)")
    p.add_argument("--large", choices=("yes", "no", "only"), default="yes",
                   help="the 1,000,100-parameter rows (100 classes x 10,000 features through a 128 KB packet limit)")
    p.add_argument("--large-interval", type=float, default=2.0, help="--min-model-interval of the large fewer-downloads row")
    p.add_argument("--large-config", action="append", default=[], metavar="MODEL_CODEC,CODEC,INTERVAL",
                   help="the large rows' fedmq configurations (repeatable)")
    args = p.parse_args()
    codecs = supported_model_codecs()
    configs = [(mc, "int8", 0.0) for mc in (codecs or [None])]
    best = "int4" if codecs and "int4" in codecs else "int8" if codecs and "int8" in codecs else (codecs or [None])[-1]
    configs += [(best, "int4", 0.0), (best, "topk:0.25+int4", 0.0), (best, "topk:0.1+int4", 0.0),
                (best, "topk:0.1+int4", args.interval)]
    if args.config:
        configs = [(mc, codec, float(iv)) for mc, codec, iv in (c.split(",") for c in args.config)]
    large_configs = [("int8", "int8", 0.0), (best, "topk:0.1+int4", 0.0), (best, "topk:0.1+int4", args.large_interval)]
    if args.large_config:
        large_configs = [(mc, codec, float(iv)) for mc, codec, iv in (c.split(",") for c in args.large_config)]
    with tempfile.TemporaryDirectory(prefix="device-bytes-") as tmp:
        workdir = Path(tmp)
        n_features = write_task(workdir, args.agents)
        digits = Task("digits", workdir, n_features, 10, args.agents, args.updates)
        large = Task("large", workdir / "large", BIG_FEATURES, BIG_CLASSES, BIG_AGENTS, BIG_UPDATES,
                     max_packet_bytes=PACKET_LIMIT, publish_interval=0.5)
        started = time.monotonic()
        runs = {}
        for task, task_configs in ((digits, configs), (large, large_configs)):
            if (task is large and args.large == "no") or (task is digits and args.large == "only"):
                continue
            if task is large:
                write_big_task(large.data, large.agents)
            flowers = {}
            if Path(args.flower_python).exists() and not args.no_flower:
                for dtype in FLOWER_DTYPES:
                    flowers[dtype] = run_flower(workdir, args.flower_python, task, dtype)
                    print("flower", json.dumps(flowers[dtype]), flush=True)
            fedmq = []
            for mc, codec, interval in task_configs:
                fedmq.append(run_fedmq(workdir, task, model_codec=mc, codec=codec, interval=interval))
                print("fedmq", json.dumps(fedmq[-1]), flush=True)
            for row in fedmq:
                row.update(versus_flower(row, flowers))
            runs[task.name] = (flowers, fedmq)
        took = time.monotonic() - started
    flowers, fedmq = runs.get("digits", ({}, []))
    missing = f"not run: {args.flower_python} missing"
    result = {
        "benchmark": "device_bytes", "dataset": "digits (standardized, 20 stratified shards)",
        "agents": args.agents, "updates": args.updates,
        "strategy": "fedasync at the coordinator's default --publish-interval",
        "method": "tcpdump on lo: IP bytes (IP + TCP headers + payload) of each device connection, connect to "
                  "goodbye, per update the device sent; CPU user+system (/proc) per update over the same windows "
                  "for every system: first_to_last (1st to last update) and second_to_last (2nd to last), "
                  "each mark the first sample (every 50 ms) that saw that update; RSS VmHWM",
        "cpu_windows": list(CPU_WINDOWS), "model_codecs_available": codecs, "seconds": round(took, 1),
        "flower": flowers.get("float64", missing), "flower_float32": flowers.get("float32", missing),
        "fedmq": fedmq,
    }
    if "large" in runs:
        large_flowers = runs["large"][0]
        result["large"] = {
            "task": f"{BIG_CLASSES} classes x {BIG_FEATURES:,} sparse binary features (1,000,100 parameters), "
                    f"{BIG_AGENTS} agents, {BIG_UPDATES} updates, mosquitto max_packet_size {PACKET_LIMIT} and "
                    f"--max-packet-bytes {PACKET_LIMIT} on both sides, --publish-interval 0.5",
            "flower": large_flowers.get("float64", "not run"), "flower_float32": large_flowers.get("float32", "not run"),
            "fedmq": runs["large"][1],
        }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
