"""Issue 19 point 1: a restart neither resets the local budget nor re-noises released statistics.

Real agent processes restarted against a real mosquitto (and coordinator): the privacy
ledger lives in an fsync'd --state-file written before each release.
"""

import json
import subprocess
import sys

import pytest
from sklearn.datasets import load_digits

from fleet import ROOT, TopicWatcher, spawn, stop
from protocol import accounting
from protocol.tabular import write_csv
from protocol.topics import Topics

pytest.importorskip("dp_accounting")
X, Y = load_digits(return_X_y=True)
TOPICS = Topics("restart")
DELTA = 1e-5
SIGMA = 1.5


def agent_argv(url, data, state, *extra):
    return ("edge_agent", "--broker", url, "--fleet", TOPICS.fleet, "--id", "dev1", "--data", data,
            "--state-file", state, "--status-interval", "0", "--poll-interval", "0.2", *extra)


def run_agent_cli(*argv):
    return subprocess.run([sys.executable, "-m", *map(str, argv)], capture_output=True, text=True, timeout=60, cwd=ROOT)


def one_error_line(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedmq-agent: error:") and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_dp_without_a_valid_state_file_refuses_unless_reset(tmp_path):
    data = tmp_path / "a.csv"
    write_csv(data, X[:50], Y[:50])
    state = tmp_path / "state.json"
    dp = ("--dp-clip", "1", "--dp-noise", SIGMA)
    argv = agent_argv("mqtt://127.0.0.1:1", data, state, *dp, "--connect-timeout", "0.5")
    one_error_line(run_agent_cli(*argv), "does not exist", "--reset-privacy-state")
    assert not state.exists()
    state.write_text('{"format": 1, "sha256": "00", "state": {}}')
    one_error_line(run_agent_cli(*argv), "corrupt", "--reset-privacy-state")
    # with the flag it starts a new ledger (then fails on the unreachable broker, exit 1) and saves it
    assert run_agent_cli(*argv, "--reset-privacy-state").returncode == 1
    saved = json.loads(state.read_text())["state"]
    assert saved["updates"] == 0 and saved["reset_at"] is not None
    # another agent's file, or one written under another sigma, is never reset over
    other = agent_argv("mqtt://127.0.0.1:1", data, state, "--dp-clip", "1", "--dp-noise", "3", "--connect-timeout", "0.5")
    one_error_line(run_agent_cli(*other, "--reset-privacy-state"), "another agent or mechanism", "dp")
    one_error_line(run_agent_cli("edge_agent", "--broker", "mqtt://127.0.0.1:1", "--fleet", TOPICS.fleet, "--id", "a",
                                 "--data", data, *dp), "--state-file")


def test_the_budget_holds_across_three_lifetimes(tmp_path, mosquitto):
    data, state = tmp_path / "a.csv", tmp_path / "dev1.state"
    write_csv(data, X[:200], Y[:200])
    allowed = 3
    budget = accounting.epsilon(SIGMA, allowed, DELTA, "replace-one") + 1e-9
    assert accounting.max_contributions(SIGMA, DELTA, budget, neighbours="replace-one") == allowed
    watcher = TopicWatcher(mosquitto.port, TOPICS.everything)
    coordinator = spawn(
        "coordinator", "--broker", mosquitto.url, "--fleet", TOPICS.fleet, "--model", "sgd-classifier",
        "--classes", ",".join(map(str, range(10))), "--n-features", 64, "--publish-interval", "0.2",
        "--dp-mode", "local", "--dp-clip", "1", "--dp-noise", SIGMA, log=tmp_path / "coordinator.log")
    argv = agent_argv(mosquitto.url, data, state, "--dp-clip", "1", "--dp-noise", SIGMA, "--dp-epsilon-budget", budget)
    status = lambda: watcher.json(TOPICS.agent_status("dev1")) or {}  # noqa: E731
    sent = lambda: {p for t, p in watcher.history if t == TOPICS.update("dev1")}  # noqa: E731
    agent = None
    try:
        agent = spawn(*argv, "--reset-privacy-state", log=tmp_path / "life1.log")
        watcher.wait_for(lambda: len(sent()) >= 1, 60, "the first lifetime's first update")
        assert stop(agent) == 0
        first = status()
        reset_at = first["privacy"]["reset_at"]
        assert reset_at is not None and first["privacy"]["neighbours"] == "replace-one"
        agent = spawn(*argv, log=tmp_path / "life2.log")  # no reset flag: the ledger continues
        second = watcher.wait_for(lambda: (s := status()).get("state") == "budget_spent" and s, 60,
                                  "the second lifetime to spend the budget")
        assert stop(agent) == 0
        assert second["privacy"]["reset_at"] == reset_at  # the reset stays visible
        agent = spawn(*argv, log=tmp_path / "life3.log")
        third = watcher.wait_for(
            lambda: (s := status()).get("state") == "budget_spent" and s.get("since", 0) > second["since"] and s,
            60, "the third lifetime to start spent")
        assert third["updates_sent"] == 0 and third["privacy"]["contributions"] == allowed
    finally:
        if agent is not None:
            stop(agent)
        stop(coordinator)
        watcher.close()
    # what left the device over three lifetimes, against the budget (was 15 updates for a budget of 3)
    assert len(sent()) == allowed
    assert accounting.epsilon(SIGMA, len(sent()), DELTA, "replace-one") <= budget


def test_noised_statistics_are_re_sent_as_the_same_bytes_after_a_restart(tmp_path, mosquitto):
    data, state = tmp_path / "a.csv", tmp_path / "dev1.state"
    write_csv(data, X[:120], Y[:120])
    watcher = TopicWatcher(mosquitto.port, TOPICS.stats("dev1"))
    argv = agent_argv(mosquitto.url, data, state, "--stats-noise", "1", "--stats-clip", "16")
    released = lambda: [p for t, p in watcher.history if t == TOPICS.stats("dev1")]  # noqa: E731
    agent = None
    try:
        for life in range(3):
            before = len(released())
            agent = spawn(*argv, *(("--reset-privacy-state",) if life == 0 else ()), log=tmp_path / f"life{life}.log")
            watcher.wait_for(lambda: len(released()) > before, 60, f"lifetime {life}'s statistics")
            assert stop(agent) == 0
            agent = None
    finally:
        if agent is not None:
            stop(agent)
        watcher.close()
    assert len(set(released())) == 1  # three lifetimes, one noised release (was one fresh noise per restart)
    saved = json.loads(state.read_text())["state"]
    assert saved["stats_releases"] == 1


def test_a_second_process_on_the_same_state_file_is_refused(tmp_path, mosquitto):
    """Red team: two processes on one ledger each spent the budget it records once (both loaded
    0 updates, the file kept the last writer's count). Seen red: the second process ran on."""
    data, state = tmp_path / "a.csv", tmp_path / "dev1.state"
    write_csv(data, X[:100], Y[:100])
    argv = agent_argv(mosquitto.url, data, state, "--dp-clip", "1", "--dp-noise", SIGMA)
    first = spawn(*argv, "--reset-privacy-state", log=tmp_path / "first.log")
    try:
        watcher = TopicWatcher(mosquitto.port, TOPICS.agent_status("dev1"))
        watcher.wait_for(lambda: watcher.json(TOPICS.agent_status("dev1")), 60, "the first process's status")
        watcher.close()
        one_error_line(run_agent_cli(*argv), "in use by another agent process", str(state))
        assert first.poll() is None
    finally:
        assert stop(first) == 0
    assert run_agent_cli(*argv, "--connect-timeout", "0.5", "--broker", "mqtt://127.0.0.1:1").returncode == 1  # free again


@pytest.mark.parametrize("field, value", [("updates", float("inf")), ("updates", 2.5), ("updates", True),
                                          ("stats_releases", "3"), ("stats_rows", -1), ("reset_at", "soon"),
                                          ("created_at", float("nan"))])
def test_a_checksummed_state_with_a_bad_field_is_corrupt_in_one_line(tmp_path, field, value):
    """Red team: a file whose digest matches but whose count is Infinity raised OverflowError (a
    traceback, not the one line); 2.5 was taken as 2. Seen red on both."""
    from edge_agent.privacy_state import PrivacyStore, StateError, _digest

    identity = {"agent": "dev1"}
    state = {"identity": identity, "updates": 1, "stats_releases": 0, "stats_rows": None, "stats_payload": None,
             "reset_at": None, "created_at": 0.0, field: value}
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"format": 1, "sha256": _digest(state), "state": state}))
    with pytest.raises(StateError, match="corrupt"):
        PrivacyStore(str(path), identity).load_or_reset(False)
