"""Agents online from their statuses (coordinator/presence.py) and the buffer that follows them, without a broker."""

from __future__ import annotations

import json

import numpy as np

from coordinator.presence import MAX_STATUS_BYTES, Presence
from coordinator.server import Coordinator
from coordinator.strategies import FedBuff, make_strategy
from coordinator.validation import UpdateValidator
from protocol.model_spec import ModelSpec
from protocol.topics import Topics

T = Topics("live")


def status(agent: str, state: str) -> tuple[str, bytes]:
    return T.agent_status(agent), json.dumps({"agent": agent, "state": state}).encode()


def test_live_agents_follow_states_and_last_wills_and_bad_statuses_are_counted():
    p = Presence(T, max_agents=3)
    for agent, state in (("a", "online"), ("b", "training"), ("c", "idle"), ("d", "idle")):
        assert p.handle(*status(agent, state)) is None
    assert p.live == {"a", "b", "c"}  # d is past the bound: not counted
    p.handle(*status("b", "error"))  # cannot train on the fleet's model
    p.handle(*status("c", "offline"))  # its last will
    p.handle(T.agent_status("a"), b"")  # its retained status cleared
    assert p.count == 0
    assert p.handle(T.agent_status("e"), b"x" * (MAX_STATUS_BYTES + 1)) == "status_oversize"
    assert p.handle(T.agent_status("e"), b"[1, 2") == "status_decode"
    assert p.handle(T.agent_status("e"), b"[1, 2]") == "status_decode"
    assert p.handle(T.update("e"), b"{}") == "status_topic"
    assert dict(p.refused_) == {"status_oversize": 1, "status_decode": 2, "status_topic": 1}


def test_fedbuff_buffer_is_min_of_k_and_live_agents():
    s = FedBuff(buffer_size=5)
    params = np.zeros(2)
    assert s.effective_size == 5  # no status seen: K
    assert not s.resize(3)
    assert s.buffer() == {"size": 5, "effective": 3, "live_agents": 3}
    assert s.add(params, np.ones(2), 1, 0) is None and s.add(params, np.ones(2), 1, 0) is None
    assert s.resize(2)  # one left: the two buffered are a full buffer
    assert s.resize(9) is False and s.effective_size == 5


def test_an_agent_leaving_steps_the_buffer_it_was_holding_up():
    spec = ModelSpec("sgd-classifier", 2, (0, 1))
    core = Coordinator(T, spec, make_strategy("fedbuff", buffer_size=5), UpdateValidator(T, spec.n_params),
                       presence=Presence(T))
    for agent in ("a", "b", "c"):
        core.handle_agent_status(*status(agent, "idle"))
    core.strategy.add(core.params_, np.ones(spec.n_params), 1, 0)
    core.strategy.add(core.params_, np.ones(spec.n_params), 1, 0)
    assert core.version_ == 0
    core.handle_agent_status(*status("c", "offline"))
    assert core.version_ == 1 and core.strategy.pending == 0
    assert core.status()["buffer"] == {"size": 5, "effective": 2, "live_agents": 2, "refused_since_step": 0}
    assert core.handle_agent_status(T.agent_status("x"), b"{") == "status_decode"
    assert core.status()["rejected"] == {"status_decode": 1}


def test_a_status_whose_state_is_no_string_is_refused_and_the_agent_not_counted():
    """Red team: {"state": []} raised TypeError (unhashable) out of paho's on_message; seen red."""
    p = Presence(T)
    assert p.handle(T.agent_status("a"), b'{"state": "online"}') is None
    for payload in (b'{"state": []}', b'{"state": {"x": 1}}', b'{"state": 7}', b'{}'):
        assert p.handle(T.agent_status("a"), payload) == "status_decode"
        assert p.count == 0
        p.handle(T.agent_status("a"), b'{"state": "online"}')


AGENTS = ["a", "b", "c", "d", "e"]


def _fedbuff_of_5_online() -> Coordinator:
    """K = 5 with 5 agents online (statuses 'training'), an absolute norm bound of 1."""
    from coordinator.validation import NormBound

    spec = ModelSpec("sgd-classifier", 2, (0, 1))
    core = Coordinator(T, spec, make_strategy("fedbuff", buffer_size=5),
                       UpdateValidator(T, spec.n_params, norm=NormBound(max_norm=1.0)), presence=Presence(T))
    for agent in AGENTS:
        core.handle_agent_status(*status(agent, "training"))
    return core


def _update(core: Coordinator, agent: str, value: float, seq: int = 1, base: int = 0) -> tuple[str, bytes]:
    from protocol import codec
    from protocol.messages import UpdateMessage, encode_update

    enc = codec.encode(np.full(core.spec.n_params, value), "float32", np.random.default_rng(0))
    return T.update(agent), encode_update(UpdateMessage(agent, seq, base, 10, enc, {}))


def test_a_refused_agent_does_not_hold_up_a_buffer_sized_to_the_agents_online():
    """5 agents online, K = 5: one update refused (as norm) and the agent trains again only on a newer model;
    the buffer waited --buffer-timeout (30 s) for it, every time (tests/test_hostile_counts.py's honest fedbuff
    fleet: 11 versions in 90 s). It steps with the 4 others at once, and K is back to 5 after the step."""
    core = _fedbuff_of_5_online()
    for agent in AGENTS[:4]:
        assert core.handle_update(*_update(core, agent, 0.1)) is None
    assert core.version_ == 0
    assert core.handle_update(*_update(core, "e", 100.0)) == "norm"
    assert core.version_ == 1 and core.strategy.pending == 0
    assert core.status()["buffer"] == {"size": 5, "effective": 5, "live_agents": 5, "refused_since_step": 0}


def test_a_refused_agent_stays_out_of_the_buffer_s_size_until_the_step():
    """The refused agent's slot stays given up whatever comes before the step: another agent's status (every
    agent sends one after each update) resized K to all 5 online and the buffer waited --buffer-timeout for
    the refused one (the honest fedbuff fleet of tests/test_hostile_counts.py: 30 s per version from version
    27 on); and a refusal into an empty buffer gives the slot up too."""
    core = _fedbuff_of_5_online()
    for agent in AGENTS[:3]:
        assert core.handle_update(*_update(core, agent, 0.1)) is None
    assert core.handle_update(*_update(core, "e", 100.0)) == "norm"
    core.handle_agent_status(*status("a", "idle"))  # a's status after its update
    assert core.status()["buffer"] == {"size": 5, "effective": 4, "live_agents": 5, "refused_since_step": 1}
    assert core.handle_update(*_update(core, "d", 0.1)) is None
    assert core.version_ == 1 and core.strategy.pending == 0
    assert core.status()["buffer"]["effective"] == 5  # all of them again for the next version
    assert core.handle_update(*_update(core, "e", 100.0, seq=2, base=1)) == "norm"  # into an empty buffer
    for agent in AGENTS[:4]:
        assert core.handle_update(*_update(core, agent, 0.1, seq=2, base=1)) is None
    assert core.version_ == 2
