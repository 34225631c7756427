"""Issue 20, "one documented command": scripts/tier-up brings the whole tier up from processes (3 NATS
nodes, partition workers, the root and a standby), prints where devices connect and how to watch the
model; real agent processes pointed at the printed URL, each with its own credentials from the device store
(`python -m tier.devices add`, the operator's documented step; tier-up --devices starts the auth service),
move the retained model forward (seen through the printed mosquitto_sub command, as the tier user); SIGTERM
stops it and leaves no process behind. With tier-up --eval-csv the root's status (and fedmq_eval_score) carries
the published model's accuracy on that held-out set: the zero model's exactly, then above 0.9 as the agents
train."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from fleet import ROOT, spawn
from protocol.tabular import write_csv

FLEET = "upf"


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (children of children too), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _exit_message(proc: subprocess.Popen) -> str:
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        return "still running"
    return f"exited {proc.returncode}: {proc.stderr.read()[-1500:]}"


def _lines_until(stream, marker: str, timeout: float) -> list[str]:
    lines: list[str] = []
    done = threading.Event()

    def read() -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))
            if marker in line:
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    done.wait(timeout)
    return lines


def _free_ports(count: int) -> int:
    """The first of `count` consecutive loopback ports free now."""
    import socket

    for base in range(20000 + os.getpid() % 20000, 60000, count):
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def test_tier_up_serves_real_agents_and_stops_clean(tmp_path):
    workdir = tmp_path / "tier"
    store, secrets = tmp_path / "devices", tmp_path / "secrets"
    subprocess.run([sys.executable, "-m", "tier.devices", "add", "--store", str(store), "--secrets", str(secrets),
                    "--fleet", FLEET, "dev-0", "dev-1", "dev-2"], check=True, cwd=ROOT, timeout=60)
    metrics = _free_ports(4)  # root1, root2, worker1, worker2
    rng = np.random.default_rng(0)
    X_eval = rng.normal(size=(400, 3))
    y_eval = (X_eval[:, 0] > 0).astype(int)
    write_csv(tmp_path / "eval.csv", X_eval, y_eval)
    up = subprocess.Popen([str(ROOT / "scripts" / "tier-up"), "--dir", str(workdir), "--fleet", FLEET,
                           "--devices", str(store),
                           "--partitions", "4", "--workers", "2", "--model", "sgd-classifier", "--n-features", "3",
                           "--classes", "0,1", "--buffer-size", "2", "--buffer-timeout", "1", "--timeout", "90",
                           "--metrics-port", str(metrics), "--max-packet-bytes", "4096",
                           "--eval-csv", str(tmp_path / "eval.csv")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    agents, watch, ack_watch = [], None, None
    try:
        banner = _lines_until(up.stdout, "stops everything", 150)
        assert banner and "stops everything" in banner[-1], (banner, _exit_message(up))
        children = _descendants(up.pid)
        names = {Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                 for p in children if _running(p)}
        assert sum("nats-server" in n for n in names) == 3, names
        assert sum("tier.worker" in n for n in names) == 2 and sum("tier.root" in n for n in names) == 2, names
        assert sum("tier.auth" in n for n in names) == 1, names
        assert all("--max-packet-bytes 4096" in n for n in names if "tier.root" in n), names
        # every root and worker serves /metrics on the port the banner names
        urls = next(line for line in banner if line.startswith("Prometheus /metrics: "))
        assert [u.split()[0] for u in urls.split(": ", 1)[1].split(", ")] == ["root1", "root2", "worker1", "worker2"]
        for i, name in enumerate(("root1", "root2", "worker1", "worker2")):
            assert f"{name} http://127.0.0.1:{metrics + i}/metrics" in urls, urls
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics + i}/metrics", timeout=10).read().decode()
            assert "fedmq_model_version" in body, (name, body[:500])

        broker = next(line.split("--broker ")[1].split()[0] for line in banner if "fedmq-agent --broker" in line)
        sub_cmd = next(line.strip() for line in banner if line.strip().startswith("mosquitto_sub "))
        watch = subprocess.Popen(["bash", "-c", f"exec {sub_cmd}"], stdout=subprocess.PIPE, text=True)
        statuses: list[dict] = []
        versions: list[int] = []
        threading.Thread(target=lambda: [(statuses.append(json.loads(line)), versions.append(statuses[-1]["version"]))
                                         for line in watch.stdout], daemon=True).start()
        # the workers' per-agent acks (protocol/acks.py) reach MQTT subscribers through NATS while they listen
        # (core NATS messages, not retained: docs/architecture.md, "Acks on the tier")
        ack_cmd = sub_cmd.replace(f"fedmq/{FLEET}/coordinator/status", f"fedmq/{FLEET}/ack/+")
        ack_watch = subprocess.Popen(["bash", "-c", f"exec {ack_cmd} -v"], stdout=subprocess.PIPE, text=True)
        acked: dict[str, int] = {}
        threading.Thread(target=lambda: [acked.__setitem__(line.split()[0].rsplit("/", 1)[1],
                                                           json.loads(line.split(None, 1)[1])["seq"])
                                         for line in ack_watch.stdout], daemon=True).start()

        first = int(next(line for line in banner if "model version " in line).split("model version ")[1].split()[0])
        deadline = time.monotonic() + 20
        while not statuses and time.monotonic() < deadline:
            time.sleep(0.1)  # polling a list a reader thread fills (the retained status comes on subscribing)
        # the fresh root's model is all zeros: it says class 0 of every row, right on exactly the 0 rows
        assert [s["accuracy"] for s in statuses if s["version"] == first][:1] == [float(np.mean(y_eval == 0))], \
            (first, statuses[:3])
        for i in range(3):
            X = rng.normal(size=(60, 3))
            write_csv(tmp_path / f"dev-{i}.csv", X, (X[:, 0] > 0).astype(int))
            agents.append(spawn("edge_agent", "--broker", broker, "--fleet", FLEET, "--id", f"dev-{i}",
                                "--username", f"dev-{i}", "--password-file", secrets / f"dev-{i}.password",
                                "--data", tmp_path / f"dev-{i}.csv", "--train-every", "0.5",
                                "--unheard-after", "10", log=tmp_path / f"dev-{i}.log"))
        def audit() -> list[dict]:
            path = workdir / "audit.jsonl"
            return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

        deadline = time.monotonic() + 90  # under load an agent may start seconds after the others: wait for all three
        learned = lambda: max([s["accuracy"] or 0 for s in statuses], default=0)  # noqa: E731
        while time.monotonic() < deadline and not (versions and max(versions) >= 3 and learned() >= 0.9
                                                   and len({r["agent"] for r in audit()}) == 3):
            time.sleep(0.2)  # polling a list a reader thread fills and a file the root appends to
        assert versions and max(versions) >= 3, (versions, (tmp_path / "dev-0.log").read_text()[-1500:],
                                                 (workdir / "root1.log").read_text()[-1500:])
        assert learned() >= 0.9, [(s["version"], s["accuracy"]) for s in statuses]
        # the active root's /metrics has it too (a standby has scored nothing)
        scraped = [urllib.request.urlopen(f"http://127.0.0.1:{metrics + i}/metrics", timeout=10).read().decode()
                   for i in (0, 1)]
        assert any('fedmq_eval_score{fleet="upf",metric="accuracy"}' in body for body in scraped), scraped
        assert {r["agent"] for r in audit()} == {"dev-0", "dev-1", "dev-2"}  # the agents' updates made the model
        deadline = time.monotonic() + 20
        while set(acked) != {"dev-0", "dev-1", "dev-2"} and time.monotonic() < deadline:
            time.sleep(0.2)  # polling a dict a reader thread fills
        acked = dict(acked)
        assert set(acked) == {"dev-0", "dev-1", "dev-2"}, acked
        folded = lambda: {(r["agent"], r["seq"]) for r in audit()}  # noqa: E731
        deadline = time.monotonic() + 20  # an acked update's partial is stored: the root folds it soon after
        while not set(acked.items()) <= folded() and time.monotonic() < deadline:
            time.sleep(0.2)  # polling a file another process appends to
        assert set(acked.items()) <= folded(), (acked, audit()[-6:])
        for i in range(3):
            log = (tmp_path / f"dev-{i}.log").read_text()
            assert "sent update" in log and "acknowledged no update" not in log, log[-1500:]
    finally:
        for proc in [*agents, *(p for p in (watch, ack_watch) if p)]:
            proc.kill()
            proc.wait(10)
        children = _descendants(up.pid) if up.poll() is None else set()
        up.send_signal(signal.SIGTERM)
        code = up.wait(60)
    assert code == 0, up.stderr.read()[-1500:]
    left = [p for p in children if _running(p)]
    assert not left, f"left running after SIGTERM: {left}"
