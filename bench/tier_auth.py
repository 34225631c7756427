"""What per-device identity costs a connect on the scale-out tier (tier/auth.py, NATS auth callout).

One real nats-server with a device store and the real auth service, and one with the shared device user
(no store), in the same run: CONNECT to CONNACK of `--connects` devices one after another (clean sessions,
so the session store is not in the figure), p50/p90 in ms; then a connect storm, `--storm` devices at once
through the callout: seconds until all are in, and the auth service's CPU per connect (/proc); and how long a
device waits for its refusal while the auth service is down (fail closed: the node's auth timeout); and, in this
process, the service's CPU per answer with the request and answer sealed (its xkey, as the nodes' config has it)
and in the clear, for the same device's request: what the sealing adds to the PBKDF2 check.

    nice python bench/tier_auth.py --out bench/results/tier_auth.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tier.cluster import NatsCluster, nats_server_binary  # noqa: E402
from tier.devices import add_devices  # noqa: E402
from tier.fleet import device_client  # noqa: E402

FLEET = "bench"


def connect_once(port: int, client_id: str, user: str | None, password: str | None, timeout: float = 30.0):
    """(seconds from CONNECT to CONNACK, the reason code) of one MQTT 3.1.1 connect (tier.fleet's device client:
    a clean session), then closed."""
    client, _ = device_client(client_id, user, password)
    got = threading.Event()
    rc = {}
    client.on_connect = lambda c, u, f, reason, p: (rc.setdefault("rc", reason), got.set())
    start = time.perf_counter()
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    got.wait(timeout)
    took = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    return took, rc.get("rc")


def percentiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50_ms": round(1000 * statistics.median(xs), 2), "p90_ms": round(1000 * xs[int(0.9 * (len(xs) - 1))], 2),
            "max_ms": round(1000 * xs[-1], 2)}


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def answer_cpu_ms(store: Path, agent: str, password: str, n: int = 200) -> dict:
    """CPU ms per tier.auth Service.answer of `agent`'s request (a node's signed JWT), sealed (service and node
    xkeys) and in the clear, in alternating rounds (the machine's load drifts alike for both)."""
    from tier.auth import Service
    from tier.devices import Store
    from tier.nkey import PREFIX_SERVER, PREFIX_USER, KeyPair, encode_jwt
    from tier.xkey import SERVER_XKEY_HEADER, XKey

    issuer, server, node, xkey = KeyPair.create(), KeyPair.create(PREFIX_SERVER), XKey.create(), XKey.create()
    request = encode_jwt({"sub": issuer.public, "nats": {
        "server_id": {"id": server.public, "xkey": node.public}, "user_nkey": KeyPair.create(PREFIX_USER).public,
        "client_info": {"type": "mqtt", "mqtt_id": agent}, "connect_opts": {"user": agent, "pass": password}}},
        server).encode()
    modes = {"sealed": (Service(Store(store), issuer, prefix="fedmq", partitions=32, xkey=xkey),
                        node.seal(request, xkey.public), {SERVER_XKEY_HEADER: node.public}),
             "plain": (Service(Store(store), issuer, prefix="fedmq", partitions=32), request, None)}
    cpu = dict.fromkeys(modes, 0.0)
    for _ in range(10):
        for mode, (service, data, headers) in modes.items():
            start = time.process_time()
            for _ in range(n // 10):
                assert service.answer(data, headers) is not None
            cpu[mode] += time.process_time() - start
    return {mode: round(1000 * s / (n // 10 * 10), 3) for mode, s in cpu.items()}


def storm(port: int, agents: list[str], passwords: dict) -> float:
    """Seconds until `agents` connecting at once all have their CONNACK (each asserted a success)."""
    clients, failures = [], []
    start = time.perf_counter()
    remaining = threading.Semaphore(0)
    for agent in agents:
        client, _ = device_client(agent, agent, passwords[agent])
        client.on_connect = lambda c, u, f, reason, p, agent=agent: (failures.append((agent, str(reason)))
                                                                     if reason.is_failure else None, remaining.release())
        client.connect_async("127.0.0.1", port, 60)
        client.loop_start()
        clients.append(client)
    for _ in agents:
        if not remaining.acquire(timeout=120):
            raise RuntimeError("connect storm: a device got no CONNACK within 120 s")
    took = time.perf_counter() - start
    for client in clients:
        client.disconnect()
        client.loop_stop()
    if failures:
        raise RuntimeError(f"connect storm: refused {failures[:3]}")
    return took


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connects", type=int, default=200, help="sequential connects per mode (default 200)")
    p.add_argument("--storm", type=int, default=300, help="devices connecting at once through the callout (default 300)")
    p.add_argument("--out", type=Path, help="write the JSON here too")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fedmq-tier-auth-"))
    agents = [f"dev-{i}" for i in range(max(args.connects, args.storm))]
    add_devices(work / "devices", work / "secrets", FLEET, agents)
    passwords = {a: (work / "secrets" / f"{a}.password").read_text().strip() for a in agents}
    result: dict = {"command": "nice python bench/tier_auth.py" + (f" --out {args.out}" if args.out else ""),
                    "nats_server": subprocess.run([nats_server_binary(), "--version"], capture_output=True,
                                                  text=True).stdout.strip(),
                    "connects": args.connects, "load_avg_1m_start": round(os.getloadavg()[0], 1)}
    with NatsCluster(work / "shared", nodes_count=1, partitions=32) as shared:
        port = shared.nodes[0].mqtt_port
        times = []
        for i in range(args.connects):
            took, rc = connect_once(port, f"anon-{i}", None, None)
            assert rc is not None and not rc.is_failure, rc
            times.append(took)
        result["shared_device_user"] = percentiles(times)
    with NatsCluster(work / "callout", nodes_count=1, partitions=32, devices=work / "devices") as cluster:
        port = cluster.nodes[0].mqtt_port
        times = []
        for agent in agents[:args.connects]:
            took, rc = connect_once(port, agent, agent, passwords[agent])
            assert rc is not None and not rc.is_failure, rc
            times.append(took)
        result["auth_callout"] = percentiles(times)
        before = cpu_s(cluster.auth_proc.pid)
        took = storm(port, agents[:args.storm], passwords)
        result["storm"] = {"devices": args.storm, "seconds": round(took, 2),
                           "auth_cpu_ms_per_connect": round(1000 * (cpu_s(cluster.auth_proc.pid) - before) / args.storm, 2)}
        cluster.stop_auth(kill=True)
        waits = []
        for agent in agents[:3]:
            took, rc = connect_once(port, agent, agent, passwords[agent])
            assert rc is not None and rc.is_failure, rc  # fail closed
            waits.append(round(took, 2))
        result["refused_while_auth_down_s"] = waits
    result["answer_cpu_ms"] = answer_cpu_ms(work / "devices", agents[0], passwords[agents[0]])
    result["load_avg_1m_end"] = round(os.getloadavg()[0], 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
