"""README.md's "Quickstart with mosquitto", run as written (its port and paths moved into a temporary directory).

Its data snippet writes the CSVs, its coordinator and agent commands learn digits on a real mosquitto, and the
agents are paced: they train once per the interval the coordinator's model asks, not back to back.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from fleet import ROOT, TopicWatcher, stop_all

BIN = Path(sys.executable).parent
README_PORT = "1884"
README_SECTION = re.compile(r"^## Quickstart with mosquitto\n.*?```sh\n(.*?)^```", re.M | re.S)


def quickstart() -> str:
    """The shell block of README.md's "Quickstart with mosquitto" section."""
    section = README_SECTION.search((ROOT / "README.md").read_text())
    assert section, "README.md has no 'Quickstart with mosquitto' section with a sh block"
    return section.group(1)


def command(block: str, tool: str) -> list[str]:
    """The block's `tool ...` command line (backslash continuations joined, a trailing & dropped)."""
    joined = block.replace("\\\n", " ")
    line = next((l.strip() for l in joined.splitlines() if l.strip().startswith(tool + " ")), None)
    assert line, f"the quick start runs no {tool}"
    return shlex.split(line.rstrip("&").strip())


def test_the_quickstart_learns_and_its_agents_train_at_the_pace_not_back_to_back(tmp_path, mosquitto):
    block = quickstart()
    snippet = re.search(r"<<'PY'\n(.*?)^PY$", block, re.M | re.S)
    assert snippet, "the quick start writes no data"
    subprocess.run([sys.executable, "-c", snippet.group(1)], cwd=tmp_path, check=True, timeout=120)

    def local(argv: list[str]) -> list[str]:
        argv = [a.replace(f"127.0.0.1:{README_PORT}", f"127.0.0.1:{mosquitto.port}") for a in argv]
        return [str(BIN / argv[0]), *argv[1:]]

    coordinator = local(command(block, "fedmq-coordinator"))
    fleet = coordinator[coordinator.index("--fleet") + 1]
    watcher = TopicWatcher(mosquitto.port, f"fedmq/{fleet}/#")
    logs = [open(tmp_path / "coordinator.log", "w")]
    procs = [subprocess.Popen(coordinator, cwd=tmp_path, stdout=logs[0], stderr=subprocess.STDOUT)]
    try:
        for i in range(3):  # the block's `for i in 0 1 2` loop
            agent = local([a.replace("$i", str(i)) for a in command(block, "fedmq-agent")])
            logs.append(open(tmp_path / f"agent-{i}.log", "w"))
            procs.append(subprocess.Popen(agent, cwd=tmp_path, stdout=logs[-1], stderr=subprocess.STDOUT))

        def updates() -> dict[str, int]:
            """Updates each agent sent so far (the watcher's history: every message on the fleet's topics)."""
            counts = {f"pi-{i}": 0 for i in range(3)}
            for topic, _ in list(watcher.history):
                agent = re.fullmatch(rf"fedmq/{fleet}/update/(pi-\d)", topic)
                if agent:
                    counts[agent.group(1)] += 1
            return counts

        status = f"fedmq/{fleet}/coordinator/status"
        watcher.wait_for(lambda: all(updates().values()), 120, "an update from each agent")
        window = 9.0
        before, opened = updates(), time.monotonic()
        watcher.wait_for(lambda: time.monotonic() - opened >= window, window + 5, "the window's end")
        after = updates()
        learnt = watcher.wait_for(lambda: (watcher.json(status) or {}).get("accuracy", 0) >= 0.85 and watcher.json(status),
                                  120, "accuracy 0.85")
        pace = learnt.get("pace")
        assert pace and pace["agents_online"] == 3, f"the coordinator paces no fleet: status {learnt}"
        # each wait is at least interval x (1 - jitter); one round may be under way as the window opens
        most = int(window / (pace["interval"] * (1 - pace["jitter"]))) + 1
        rounds = {agent: after[agent] - before[agent] for agent in after}
        assert max(rounds.values()) <= most, (f"updates sent in {window:g} s: {rounds}, at most {most} each at the "
                                              f"pace {pace}: the agents train back to back")
    finally:
        watcher.close()
        codes = stop_all(procs[1:]) + stop_all(procs[:1])
        for log in logs:
            log.close()
    assert codes == [0, 0, 0, 0], codes
