"""Every CLI flag, agent state and Prometheus metric is documented in README.md or docs/ (issue 22).

Read from the code, so a new flag, state or metric without a word in the docs fails here.
"""

from __future__ import annotations

import re

import pytest

from coordinator.cli import build_parser as coordinator_parser
from protocol.agent_states import STATES
from edge_agent.cli import build_parser as agent_parser
from fleet import ROOT
from monitor.cli import build_parser as monitor_parser
from monitor.cli import build_report_parser
from simulation.cli import build_parser as sim_parser

PARSERS = {"fedmq-agent": agent_parser, "fedmq-coordinator": coordinator_parser,
           "fedmq-monitor": monitor_parser, "fedmq-report": build_report_parser,
           "fedmq-sim": sim_parser}


def docs_text() -> str:
    return "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])


def flags(build) -> list[str]:
    return sorted({s for action in build()._actions for s in action.option_strings if s.startswith("--")})


def metrics() -> list[str]:
    """The metric family names coordinator/metrics.py and the tier's tier/metrics.py expose (counters gain
    _total on the wire)."""
    source = "\n".join((ROOT / path).read_text() for path in ("coordinator/metrics.py", "tier/metrics.py"))
    names = sorted(set(re.findall(r'"(fedmq_[a-z_]+)"', source)))
    assert len(names) >= 10, f"found only {names} in coordinator/metrics.py: has it changed shape?"
    return names


@pytest.mark.parametrize("tool", sorted(PARSERS))
def test_every_flag_is_documented(tool):
    text = docs_text()
    found = flags(PARSERS[tool])
    assert "--help" in found and len(found) > 2
    missing = [f for f in found if not re.search(re.escape(f) + r"(?![\w-])", text)]
    assert not missing, f"{tool} flags documented nowhere in README.md or docs/: {missing}"


def test_every_agent_state_is_documented():
    text = docs_text()
    assert len(STATES) >= 6
    missing = [s for s in STATES if f"`{s}`" not in text]
    assert not missing, f"agent states documented nowhere in README.md or docs/ (as `state`): {missing}"


def test_every_metric_is_documented():
    text = docs_text()
    missing = [m for m in metrics() if not re.search(re.escape(m) + r"(_total)?(?![a-z_])", text)]
    assert not missing, f"Prometheus metrics documented nowhere in README.md or docs/: {missing}"
