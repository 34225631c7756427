"""fedmq-report: series from real status documents, a PNG from a real coordinator's --metrics-log,
and one-line errors with exit status 2 for a missing, empty or unreadable log."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator.status import build_status
from fleet import TopicWatcher, spawn, stop
from monitor.report import ReportError, read_log, series
from protocol import codec
from protocol.messages import UpdateMessage, encode_update
from protocol.tabular import write_csv
from protocol.topics import Topics

FLEET = "rep"
T = Topics(FLEET)
REPORT = Path(sys.executable).parent / "fedmq-report"
WAIT = 30
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def status(version: int, now: float, *, classifier: bool = True, started_at: float = 1000.0) -> dict:
    score = {"accuracy": 0.5 + version / 100} if classifier else {"r2": 0.9}
    fleet_eval = {("accuracy" if classifier else "r2"): 0.6, "loss": 1.0 / (1 + version)}
    return build_status(fleet=FLEET, strategy="fedbuff", version=version, published_version=version,
                        accepted=2 * version, rejected={}, clipped=0, pending=0, staleness_sum=3.0 * version,
                        staleness_max=version, is_classifier=classifier, scores=score if version else {},
                        fleet_eval=fleet_eval, agents=2, started_at=started_at, now=now)


def write_log(path: Path, docs: list, extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs) + "".join(line + "\n" for line in extra_lines))
    return path


def run_report(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPORT), *map(str, args)], capture_output=True, text=True, timeout=60)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (800, 900) and len(data) > 20_000


def test_series_from_status_documents(tmp_path):
    docs = [status(v, 1010.0 + v) for v in range(4)]
    docs.append(status(6, 2005.0, started_at=2000.0))  # a restarted coordinator appends to the same log
    data = series(read_log(write_log(tmp_path / "m.jsonl", docs))[0])
    assert data.metric == "accuracy" and data.fleet == FLEET
    assert data.seconds == [10.0, 11.0, 12.0, 13.0, 1005.0] and data.versions == [0, 1, 2, 3, 6]
    assert data.score[0] is None and data.score[1:] == pytest.approx([0.51, 0.52, 0.53, 0.56])
    assert data.fleet_score == [0.6] * 5 and data.staleness_max == [0, 1, 2, 3, 6]
    assert data.staleness_mean == [0.0, 1.5, 1.5, 1.5, 1.5]
    regressor = series([status(v, 1000.0 + v, classifier=False) for v in range(3)])
    assert regressor.metric == "r2" and regressor.score == [None, 0.9, 0.9]


def test_report_of_a_real_coordinators_metrics_log(tmp_path, mosquitto):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 4))
    write_csv(tmp_path / "eval.csv", X, (X[:, 0] > 0).astype(int) + (X[:, 1] > 0))
    log = tmp_path / "metrics.jsonl"
    watcher = TopicWatcher(mosquitto.port, T.everything)
    coord = spawn("coordinator", "--broker", mosquitto.url, "--fleet", FLEET, "--model", "sgd-classifier",
                  "--n-features", 4, "--classes", "0,1,2", "--publish-interval", "0.1", "--eval-csv",
                  tmp_path / "eval.csv", "--metrics-log", log,
                  "--no-feature-stats",  # hand-made updates, no agent sends statistics: without this the first model waits for them
                  log=tmp_path / "coordinator.log")
    try:
        def version() -> int:
            return (watcher.json(T.coordinator_status) or {}).get("published_version", -1)

        watcher.wait_for(lambda: version() == 0, WAIT, "the first model")
        for seq in range(1, 5):  # one update per published version, each on the newest base
            base = version()
            delta = codec.encode(rng.normal(size=15), "int8", rng)
            payload = encode_update(UpdateMessage("a", seq, base, 20, delta, {"eval_accuracy": 0.5}))
            watcher.client.publish(T.update("a"), payload, qos=1).wait_for_publish(WAIT)
            watcher.wait_for(lambda: version() > base, WAIT, f"a version after {base}")
    finally:
        assert stop(coord) == 0
        watcher.close()
    statuses, skipped = read_log(log)
    assert skipped == 0 and len(statuses) >= 5 and statuses[-1]["version"] == 4
    assert all(s["accuracy"] is not None for s in statuses)

    proc = run_report(log, "-o", tmp_path / "out.png")
    assert proc.returncode == 0, proc.stderr
    assert_png(tmp_path / "out.png")
    assert proc.stdout.strip() == f"{tmp_path / 'out.png'}: {len(statuses)} statuses, versions 0 to 4"
    proc = run_report(log, "--x", "version")  # default output: the log's name with .png
    assert proc.returncode == 0, proc.stderr
    assert_png(tmp_path / "metrics.png")


def test_bad_lines_are_skipped_with_a_warning(tmp_path):
    log = write_log(tmp_path / "m.jsonl", [status(v, 1001.0 + v) for v in range(3)],
                    ("not json at all", '{"version": 3, "updated_at": 10', "[1, 2]", '{"no": "version"}', ""))
    proc = run_report(log, "-o", tmp_path / "m.png")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == f"fedmq-report: warning: skipped 4 line(s) of {log} that are not status JSON"
    assert_png(tmp_path / "m.png")


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("", "is empty"),
    ("\n  \n", "is empty"),
    ("garbage\n{\"half\": \n", "none of its 2 lines is a coordinator status"),
])
def test_missing_empty_or_unreadable_log_exits_2(tmp_path, content, message):
    log = tmp_path / "m.jsonl"
    if content is not None:
        log.write_text(content)
    proc = run_report(log)
    assert proc.returncode == 2 and proc.stderr.startswith("fedmq-report: error: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "m.png").exists()


def test_unwritable_output_exits_2(tmp_path):
    log = write_log(tmp_path / "m.jsonl", [status(1, 1001.0)])
    proc = run_report(log, "-o", tmp_path / "no" / "such" / "dir.png")
    assert proc.returncode == 2 and "cannot write" in proc.stderr and "Traceback" not in proc.stderr


def test_read_log_errors_are_report_errors(tmp_path):
    with pytest.raises(ReportError, match="no such file"):
        read_log(tmp_path / "absent.jsonl")
