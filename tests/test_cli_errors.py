"""Every fedmq command says what is wrong with its configuration in one line (usage only with --help),
and a module of an extra that is not installed is named in one line with the extra that brings it."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = {
    "fedmq-agent": "edge_agent.cli:main",
    "fedmq-coordinator": "coordinator.cli:main",
    "fedmq-sim": "simulation.cli:main",
    "fedmq-monitor": "monitor.cli:main",
    "fedmq-report": "monitor.cli:report_main",
}
# (args, a part of the message): a missing required option, an unknown flag, a bad value
BAD = {
    "fedmq-agent": [([], "--broker is required"), (["--bogus"], "unrecognized arguments: --bogus"),
                    (["--broker", "mqtt://x", "--fleet", "f", "--id", "a", "--data", "x.csv", "--codec", "int9"], "int9")],
    "fedmq-coordinator": [([], "--broker is required"), (["--bogus"], "unrecognized arguments: --bogus"),
                          (["--broker", "mqtt://x", "--fleet", "f", "--strategy", "nope"], "nope")],
    "fedmq-sim": [(["--bogus"], "unrecognized arguments: --bogus"), (["--agents", "x"], "invalid int value"),
                  (["--agents", "0"], "--agents must be >= 1")],
    "fedmq-monitor": [([], "--broker is required"), (["--bogus"], "unrecognized arguments: --bogus")],
    "fedmq-report": [([], "the following arguments are required: LOG.jsonl"), (["a", "--x", "z"], "invalid choice")],
}


def run(command: str, args: list[str], block: str | None = None) -> subprocess.CompletedProcess:
    module, func = COMMANDS[command].split(":")
    code = (f"import sys; sys.argv[0] = {command!r}; "
            + (f"sys.modules[{block!r}] = None; " if block else "")
            + f"from {module} import {func}; sys.exit({func}({args!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])})


@pytest.mark.parametrize("command,args,part", [(c, a, p) for c, cases in BAD.items() for a, p in cases])
def test_a_configuration_error_is_one_line(command, args, part):
    proc = run(command, args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"{command} {args}: {len(lines)} lines:\n{proc.stderr}"
    assert lines[0].startswith(f"{command}: error: ") and part in lines[0], lines[0]
    assert "usage" not in proc.stderr.lower()


@pytest.mark.parametrize("command", COMMANDS)
def test_help_still_shows_the_usage(command):
    proc = run(command, ["--help"])
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {command}"), proc.stdout[:200] + proc.stderr


def test_a_missing_extra_is_named_in_one_line(tmp_path):
    proc = run("fedmq-sim", ["--duration", "1", "--no-progress", "--plot", str(tmp_path / "p.png")], block="rich")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["fedmq-sim: error: rich is missing: pip install 'fedmq[sim]'"], proc.stderr


@pytest.mark.parametrize("command", ["fedmq-agent", "fedmq-coordinator"])
def test_a_plain_install_without_the_optional_crypto_starts(command):
    """`pip install fedmq` (the agent's light install, the Docker images) has no cryptography:
    only --secure-aggregation may need it."""
    proc = run(command, ["--help"], block="cryptography")
    assert proc.returncode == 0, proc.stderr[-2000:]
