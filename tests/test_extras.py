"""A feature whose extra is not installed is one line naming the extra, exit 2, before any broker.

The real CLIs run as processes with the extra's module made unimportable: a directory first on
PYTHONPATH holds a package of that name that raises ModuleNotFoundError, as a missing one does.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fleet import ROOT

UNREACHABLE = "mqtt://127.0.0.1:1"  # never reached: the configuration fails first


def run_without(module: str, tool: str, *args: str, tmp_path) -> subprocess.CompletedProcess:
    blocked = tmp_path / "blocked" / module
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{module}'\", name='{module}')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'blocked'}{os.pathsep}{ROOT}"}
    return subprocess.run([sys.executable, "-m", tool, "--broker", UNREACHABLE, "--fleet", "x", *args],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)


AGENT = ("--id", "a1", "--data", "missing.csv")
COORDINATOR = ("--model", "sgd-classifier", "--n-features", "4", "--classes", "0,1")

CASES = [
    ("cryptography", "edge_agent", (*AGENT, "--secure-aggregation"), "fedmq[secagg]"),
    ("cryptography", "coordinator", (*COORDINATOR, "--strategy", "fedbuff", "--secure-aggregation"), "fedmq[secagg]"),
    ("dp_accounting", "edge_agent", (*AGENT, "--dp-clip", "1", "--dp-noise", "1"), "fedmq[dp]"),
    ("dp_accounting", "coordinator", (*COORDINATOR, "--strategy", "fedbuff", "--dp-mode", "central",
                                      "--dp-clip", "1", "--dp-noise", "1"), "fedmq[dp]"),
]


@pytest.mark.parametrize("module, tool, args, extra", CASES, ids=[f"{c[1]}-{c[3]}" for c in CASES])
def test_a_missing_extra_is_one_line_naming_it(module, tool, args, extra, tmp_path):
    proc = run_without(module, tool, *args, tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"pip install '{extra}'" in lines[0], lines[0]


def test_with_the_extra_installed_the_same_flags_get_past_the_check(tmp_path):
    """The blocker is what made the case fail: without it the agent goes on to its data (missing.csv)."""
    proc = subprocess.run([sys.executable, "-m", "edge_agent", "--broker", UNREACHABLE, "--fleet", "x", *AGENT,
                           "--secure-aggregation"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "missing.csv" in proc.stderr and "fedmq[" not in proc.stderr, proc.stderr
