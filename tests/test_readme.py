"""The --help blocks in docs/cli.md are what the tools print, so the docs cannot drift from the code."""

from __future__ import annotations

import re

import pytest

from coordinator.cli import build_parser as coordinator_parser
from edge_agent.cli import build_parser as agent_parser
from fleet import ROOT
from monitor.cli import build_parser as monitor_parser
from monitor.cli import build_report_parser
from simulation.cli import build_parser as sim_parser
from tier.auth import build_parser as auth_parser
from tier.root import build_parser as root_parser
from tier.up import build_parser as up_parser
from tier.worker import build_parser as worker_parser

PARSERS = {
    "fedmq-agent": agent_parser,
    "fedmq-coordinator": coordinator_parser,
    "fedmq-monitor": monitor_parser,
    "fedmq-report": build_report_parser,
    "fedmq-sim": sim_parser,
    "tier-up": up_parser,
    "python -m tier.root": root_parser,
    "python -m tier.worker": worker_parser,
    "python -m tier.auth": auth_parser,
}


def help_text(build, monkeypatch) -> str:
    """--help as an 80-column terminal shows it (argparse reads COLUMNS)."""
    monkeypatch.setenv("COLUMNS", "80")
    return build().format_help().rstrip()


CLI_DOC = ROOT / "docs" / "cli.md"


def readme_help_blocks() -> dict[str, str]:
    text = CLI_DOC.read_text()
    return {m.group(1): m.group(0).rstrip() for m in re.finditer(r"^usage: (fedmq-[a-z]+|tier-up|python -m tier\.[a-z]+) .*?(?=^```)", text, re.M | re.S)}


@pytest.mark.parametrize("tool", sorted(PARSERS))
def test_readme_shows_the_real_help(tool, monkeypatch):
    blocks = readme_help_blocks()
    assert tool in blocks, f"docs/cli.md has no --help block for {tool}"
    assert blocks[tool] == help_text(PARSERS[tool], monkeypatch), (
        f"docs/cli.md's {tool} --help is out of date: regenerate it with `COLUMNS=80 {tool} --help`")


def test_the_simulators_help_says_each_default(monkeypatch):
    """fedmq-sim --help named no default (a newcomer could not tell that a bare run is 20 agents for 30 s); seen red
    without simulation.cli.say_defaults."""
    text = help_text(sim_parser, monkeypatch)
    for said in ("number of virtual agents (default: 20)", "seconds to run (default: 30.0)", "(default: fedasync)"):
        assert said in text
