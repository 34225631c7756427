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
                          (["--broker", "mqtt://x", "--fleet", "f", "--strategy", "nope"], "nope"),
                          # no --n-features: it used to wait for the fleet's schema first, then name the file
                          (["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--model", "sgd-classifier",
                            "--eval-csv", "no-such.csv"], "no-such.csv: no such file")],
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


def test_the_simulator_on_a_broker_that_does_not_answer_says_so_in_one_line(tmp_path):
    """fedmq-sim --broker to a closed port printed a traceback per simulated client, then a summary of zeros, exit 0;
    seen red without simulation.cli.reach."""
    proc = run("fedmq-sim", ["--broker", "mqtt://127.0.0.1:1", "--duration", "1", "--no-progress",
                             "--plot", str(tmp_path / "p.png")])
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == ["fedmq-sim: error: cannot reach broker at mqtt://127.0.0.1:1: Connection refused"], \
        proc.stderr[-2000:]


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


@pytest.mark.parametrize("script", ["tier-up", "tier-cluster"])
def test_a_tier_launcher_without_the_tier_extra_says_so_in_one_line(tmp_path, script):
    """After `scripts/setup` alone (the demo's set-up: no tier extra) scripts/tier-up ended in a traceback
    ('No module named nats'); seen red without the scripts' check. A copy of the script runs against a .venv
    whose python sees no site-packages (-S), so neither nats nor cryptography can be imported."""
    import os
    import shutil
    from pathlib import Path

    (tmp_path / "scripts").mkdir()
    shutil.copy(Path(__file__).parents[1] / "scripts" / script, tmp_path / "scripts" / script)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python.chmod(0o755)
    proc = subprocess.run([str(tmp_path / "scripts" / script), "--help"], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [f"{script}: error: the scale-out tier's packages are not in .venv: run "
                                        "scripts/setup --test or .venv/bin/pip install -e '.[tier]'"], proc.stderr


@pytest.mark.parametrize("module,args,line", [
    ("tier.up", [], "tier-up: error: choose how devices log in"),
    ("tier.cluster", ["--nodes", "2"], "tier-cluster: error: argument --nodes: invalid choice"),
    ("tier.root", ["--fleet", "f"], "python -m tier.root: error: --nats is required (or FEDMQ_NATS / nats in --config)"),
    ("tier.worker", [], "python -m tier.worker: error: --nats is required (or FEDMQ_NATS / nats in --config)"),
    ("tier.auth", ["--bogus", "x"], "python -m tier.auth: error: unrecognized arguments: --bogus (values not shown)"),
    ("tier.auth", ["--nats", "nats://127.0.0.1:1", "--devices", "d", "--issuer-seed-file", "s"],
     "python -m tier.auth: error: --xkey-seed-file is required: the nodes seal each login"),  # logins never in the clear unasked
    ("tier.devices", ["add", "--store", "s", "--secrets", "d", "--fleet", "f", "a.b"],
     "python -m tier.devices: error: invalid agent id 'a.b'"),
])
def test_a_tier_tools_configuration_error_is_one_line(tmp_path, module, args, line):
    """The tier's commands printed their whole usage (10-30 lines) before the error; now the fedmq commands'
    CliParser: one line. Seen red with argparse.ArgumentParser back in tier/up.py (usage above the error)."""
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin",
                                             "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])})
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(line), proc.stderr
