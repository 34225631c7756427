"""Edge footprint benchmark: one real `fedmq-agent` process beside the floor its
dependencies set, measured in the same run. Prints JSON.

    python bench/edge.py                              # on this machine
    python bench/edge.py --pi-root "$(scripts/pi-root path)"   # in the emulated aarch64 root
                                                      # (qemu-user) that scripts/pi-root build makes
Figures:
- floor: a process that only imports numpy, sklearn.linear_model, paho-mqtt and msgpack
  (peak RSS, import seconds);
- agent: peak RSS of a fedmq-agent that trains on a 10,000-parameter model, and seconds from
  process start to its first update arriving at the broker (model already retained);
- per update, in one process: train (partial_fit epoch) and encode (int8 + error feedback).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N_CLASSES, N_FEATURES, N_ROWS = 10, 999, 500  # 10 x 999 + 10 = 10,000 parameters
FLOOR = ("import time; t = time.perf_counter(); import numpy, sklearn.linear_model, paho.mqtt.client, msgpack; "
         "import json; print(json.dumps({'import_s': time.perf_counter() - t}))")
BARE = "print('{}')"  # python -c pass, with a JSON line


def inner_timing(data_csv: str, repeats: int = 20) -> dict:
    """Run inside the target interpreter: per-update train and encode times."""
    import numpy as np

    from edge_agent.error_feedback import ErrorFeedback
    from edge_agent.trainer import LocalTrainer
    from protocol.messages import ModelMessage
    from protocol.model_spec import ModelSpec
    from protocol.tabular import load_csv

    X, y = load_csv(data_csv)
    spec = ModelSpec("sgd-classifier", N_FEATURES, tuple(range(N_CLASSES)))
    model = ModelMessage("edge", 1, spec, np.zeros(spec.n_params))
    trainer, feedback = LocalTrainer(random_state=0), ErrorFeedback("int8", np.random.default_rng(0))
    train_s, encode_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = trainer.train(model, X, y)
        t1 = time.perf_counter()
        feedback.encode(result.delta)
        encode_s.append(time.perf_counter() - t1)
        train_s.append(t1 - t0)
    return {"n_params": spec.n_params, "rows": len(y), "train_ms_median": 1e3 * statistics.median(train_s),
            "encode_ms_median": 1e3 * statistics.median(encode_s)}


class Target:
    """Where the measured processes run: here, or chrooted into the emulated Pi root."""

    def __init__(self, pi_root: str | None) -> None:
        self.pi_root = Path(pi_root) if pi_root else None
        if self.pi_root:
            self.src = self.pi_root / "opt" / "fedmq-src"
            # the checkout into /opt/fedmq-src, pip-installed into the root's venv (which has the
            # dependencies already: scripts/pi-root build), timed
            started = time.perf_counter()
            subprocess.run([str(ROOT / "scripts" / "pi-root"), "install"], check=True, capture_output=True,
                           env={**os.environ, "FEDMQ_PI_ROOT": str(self.pi_root)})
            self.install_s = time.perf_counter() - started
            self.workdir = Path(tempfile.mkdtemp(dir=self.pi_root / "tmp"))
        else:
            self.workdir = Path(tempfile.mkdtemp())

    def venv_disk(self) -> dict:
        """MB on disk: the root's whole venv, and per package in its site-packages."""
        def mb(path: Path) -> float:
            return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() or f.is_symlink()) / 1e6 if path.exists() else 0.0

        venv = self.pi_root / "opt" / "venv"
        site = next(venv.glob("lib/python3*/site-packages"))
        fedmq = sum(mb(site / name) for name in ("protocol", "edge_agent", "coordinator", "simulation", "monitor"))
        fedmq += sum(mb(d) for d in site.glob("fedmq-*.dist-info"))
        return {"venv_mb": round(mb(venv), 1), "scipy_mb": round(mb(site / "scipy") + sum(mb(d) for d in site.glob("scipy.libs")), 1),
                "numpy_mb": round(mb(site / "numpy") + sum(mb(d) for d in site.glob("numpy.libs")), 1),
                "scikit_learn_mb": round(mb(site / "sklearn") + sum(mb(d) for d in site.glob("scikit_learn.libs")), 1),
                "fedmq_mb": round(fedmq, 2)}

    def prefix(self) -> list[str]:
        if self.pi_root:
            return ["chroot", str(self.pi_root), "/opt/venv/bin/python"]
        return [sys.executable]

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"}
        env["PYTHONPATH"] = "" if self.pi_root else str(ROOT)
        env["QEMU_CPU"] = "cortex-a72"  # a Pi 4's CPU: no SVE kernels a Pi never runs
        return env

    def inside(self, host_path: Path) -> str:
        """The path a target process sees for `host_path`."""
        return "/" + str(host_path.relative_to(self.pi_root)) if self.pi_root else str(host_path)

    def run_json(self, args: list[str]) -> dict:
        out = subprocess.run(self.prefix() + args, check=True, capture_output=True, text=True, env=self.env())
        return json.loads(out.stdout.strip().splitlines()[-1])

    def peak_rss_mb(self, args: list[str]) -> tuple[float, dict]:
        """Peak RSS of a target process as /usr/bin/time sees it (as for the agent), and its JSON.

        Not getrusage() inside the process: Linux carries ru_maxrss across fork + exec, so a
        child of this benchmark would report this process's RSS (about 128 MB) as its own."""
        out = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB=%M", *self.prefix(), *args], check=True,
                             capture_output=True, text=True, env=self.env())
        rss_kb = int(out.stderr.rsplit("MAXRSS_KB=", 1)[1].split()[0])
        return rss_kb / 1024, json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pi-root", help="emulated aarch64 root (scripts/pi-root build; scripts/pi-root path prints it)")
    p.add_argument("--inner-timing", metavar="CSV", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3, help="agent process starts to take the median of")
    args = p.parse_args()
    if args.inner_timing:
        print(json.dumps(inner_timing(args.inner_timing)))
        return
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import psutil

    from protocol.messages import ModelMessage, decode_update, encode_model
    from protocol.model_spec import ModelSpec
    from protocol.tabular import write_csv
    from protocol.topics import Topics
    from simulation.mosquitto import Mosquitto

    sys.path.insert(0, str(ROOT / "tests"))
    from fleet import TopicWatcher

    target = Target(args.pi_root)
    rng = np.random.default_rng(0)
    data = target.workdir / "edge.csv"
    write_csv(data, rng.normal(size=(N_ROWS, N_FEATURES)), rng.integers(0, N_CLASSES, N_ROWS))
    floors = [{"peak_rss_mb": rss, **out} for rss, out in (target.peak_rss_mb(["-c", FLOOR]) for _ in range(args.repeats))]
    bare = statistics.median(target.peak_rss_mb(["-c", BARE])[0] for _ in range(args.repeats))
    timing = target.run_json([target.inside(target.src / "bench" / "edge.py") if target.pi_root else __file__,
                              "--inner-timing", target.inside(data)])
    topics = Topics("edge")
    spec = ModelSpec("sgd-classifier", N_FEATURES, tuple(range(N_CLASSES)))
    runs = []
    with Mosquitto(Path(tempfile.mkdtemp())) as broker:
        watcher = TopicWatcher(broker.port, topics.everything)
        watcher.client.publish(topics.model, encode_model(ModelMessage("edge", 1, spec, np.zeros(spec.n_params))),
                               qos=1, retain=True).wait_for_publish(10)
        for i in range(args.repeats):
            agent_id = f"edge{i}"
            cmd = ["/usr/bin/time", "-f", "MAXRSS_KB=%M", *target.prefix(), "-m", "edge_agent", "--broker", broker.url,
                   "--fleet", "edge", "--id", agent_id, "--data", target.inside(data), "--log-level", "WARNING"]
            started = time.perf_counter()
            proc = subprocess.Popen(cmd, env=target.env(), stderr=subprocess.PIPE, text=True, cwd=str(target.workdir))
            payload = watcher.wait_for(lambda: watcher.latest.get(topics.update(agent_id)), 300, "first update")
            first_update_s = time.perf_counter() - started
            for child in psutil.Process(proc.pid).children():  # the agent under /usr/bin/time
                child.terminate()
            _, err = proc.communicate(timeout=60)
            rss_kb = int(err.rsplit("MAXRSS_KB=", 1)[1].split()[0])
            runs.append({"first_update_s": first_update_s, "peak_rss_mb": rss_kb / 1024,
                         "update_bytes": len(payload), "base_version": decode_update(payload).base_version})
        watcher.close()
    floor_rss = statistics.median(f["peak_rss_mb"] for f in floors)
    floor_import = statistics.median(f["import_s"] for f in floors)
    agent_rss = statistics.median(r["peak_rss_mb"] for r in runs)
    first = statistics.median(r["first_update_s"] for r in runs)
    print(json.dumps({
        "benchmark": "edge", "target": "emulated aarch64 (qemu-user, cortex-a72)" if args.pi_root else os.uname().machine,
        "n_params": spec.n_params, "rows": N_ROWS,
        "floor": {"peak_rss_mb": round(floor_rss, 1), "import_s": round(floor_import, 3),
                  "bare_python_rss_mb": round(bare, 1)},  # python -c pass: the interpreter (and qemu) alone
        "agent": {"peak_rss_mb": round(agent_rss, 1), "first_update_s": round(first, 3),
                  "update_bytes": runs[0]["update_bytes"]},
        "per_update": {k: round(v, 3) if isinstance(v, float) else v for k, v in timing.items()},
        "vs_targets": {
            "rss_over_floor_mb": round(agent_rss - floor_rss, 1), "rss_target_mb": 20,
            "first_update_over_import_floor_s": round(first - floor_import, 3), "first_update_target_s": 1.0,
            "encode_ms": round(timing["encode_ms_median"], 3), "encode_target_ms": 10,
        },
        **({"install": {"pip_install_fedmq_s": round(target.install_s, 1), **target.venv_disk()}} if args.pi_root else {}),
        "runs": runs,
    }, indent=1))


if __name__ == "__main__":
    main()
