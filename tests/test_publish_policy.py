"""When a changed model is published (coordinator/publish_policy.py): the pure decision, the
waiting agents' count, and the core's use of both (no broker)."""

import math

import numpy as np
import pytest

from coordinator.publish_policy import CLOCK, AgentsWaiting, PublishPolicy, publish_due, relative_change
from coordinator.strategies import FedAsync, FedBuff
from tests.test_coordinator_core import SPEC, make_core, update

CHANGE = PublishPolicy(max_interval=1.0, min_interval=0.05, min_change=0.05, waiting_share=0.5)


def test_clock_publishes_a_changed_model_once_the_interval_passed_whatever_moved():
    clock = PublishPolicy(max_interval=1.0, kind=CLOCK)
    assert not publish_due(clock, since_last=0.9, changed=True, change=math.inf, waiting=20, active=20)
    assert publish_due(clock, since_last=1.0, changed=True)
    assert not publish_due(clock, since_last=50.0, changed=False)


def test_change_policy_floor_ceiling_change_and_waiting():
    assert not publish_due(CHANGE, since_last=0.04, changed=True, change=math.inf, waiting=20, active=20)  # floor
    assert publish_due(CHANGE, since_last=0.05, changed=True, change=0.05)  # moved enough
    assert not publish_due(CHANGE, since_last=0.5, changed=True, change=0.049, waiting=9, active=20)
    assert publish_due(CHANGE, since_last=0.5, changed=True, change=0.0, waiting=10, active=20)  # half the fleet waits
    assert publish_due(CHANGE, since_last=0.06, changed=True, waiting=1, active=1)  # the lone agent waits
    assert not publish_due(CHANGE, since_last=0.5, changed=True, waiting=0, active=0)
    assert publish_due(CHANGE, since_last=1.0, changed=True)  # the ceiling: stragglers' small steps
    assert not publish_due(CHANGE, since_last=9.0, changed=False, change=math.inf, waiting=20, active=20)


def test_the_floor_is_at_most_the_ceiling():
    tight = PublishPolicy(max_interval=0.02, min_interval=0.05)
    assert publish_due(tight, since_last=0.02, changed=True)
    assert not publish_due(tight, since_last=0.01, changed=True, change=math.inf)


@pytest.mark.parametrize("kwargs", [dict(kind="sometimes"), dict(min_change=0), dict(waiting_share=0),
                                    dict(waiting_share=1.5), dict(min_interval=-1), dict(max_interval=math.nan)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        PublishPolicy(**kwargs)


def test_relative_change():
    assert relative_change(np.ones(3), None) == math.inf
    assert relative_change(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_change(np.ones(3), np.zeros(3)) == math.inf
    assert relative_change(np.array([3.0, 4.0]) * 1.1, np.array([3.0, 4.0])) == pytest.approx(0.1)


def test_agents_waiting_follow_the_published_version():
    w = AgentsWaiting()
    w.publishing(0)
    w.folded("a", 0)
    w.folded("b", 0)
    assert (w.waiting, w.active) == (2, 2)
    w.publishing(1)  # both get version 1: training, not waiting, still active
    assert (w.waiting, w.active) == (0, 2)
    w.folded("a", 1)
    assert (w.waiting, w.active) == (1, 2)
    w.publishing(2)
    w.publishing(3)  # b answered neither of the last two: no longer counted
    w.folded("a", 3)
    assert (w.waiting, w.active) == (1, 1)
    assert sum(w.by_base.values()) == 2 and 0 in w.by_base and 1 not in w.by_base  # one entry per agent, none empty


def test_the_core_publishes_when_the_waiting_quorum_is_reached_not_on_the_clock():
    core = make_core(FedAsync(alpha=0.01), publish_policy=CHANGE)
    core.model_payload(now=100.0)  # version 0 to agents a..d
    for i, agent in enumerate("abcd"):
        core.handle_update(*update(agent, 1, base=0, delta=np.full(SPEC.n_params, 1.0)))
    core.model_payload(now=101.0)  # version 4, |params| ~ 0.04
    core.handle_update(*update("a", 2, base=4, delta=np.full(SPEC.n_params, 1e-3)))  # a tiny step: 1 of 4 waits
    assert core.version_ == 5 and not core.publish_due(now=101.5)
    core.handle_update(*update("b", 2, base=4, delta=np.full(SPEC.n_params, 1e-3)))  # 2 of 4 wait
    assert not core.publish_due(now=101.04)  # the floor
    assert core.publish_due(now=101.06)


def test_the_core_publishes_a_large_step_at_once_and_a_fedbuff_step_to_its_waiting_contributors():
    core = make_core(FedAsync(alpha=1.0), publish_policy=CHANGE)
    core.model_payload(now=100.0)
    core.handle_update(*update("x", 1, base=0))
    core.model_payload(now=100.1)  # version 1: params 0.1
    for agent in "bcdefgh":  # seven more agents answered version 0: active, not waiting
        core.waiting_.folded(agent, 0)
    core.handle_update(*update("a", 1, base=1, delta=np.full(SPEC.n_params, 1e-4)))  # 1 of 9 waits, a tiny step
    assert (core.waiting_.waiting, core.waiting_.active) == (1, 9) and not core.publish_due(now=100.5)
    core.handle_update(*update("b", 1, base=1))  # a step of the model's own size
    assert (core.waiting_.waiting, core.waiting_.active) == (2, 9) and core.publish_due(now=100.16)
    buffered = make_core(FedBuff(buffer_size=2), publish_policy=CHANGE)
    buffered.model_payload(now=100.0)
    buffered.handle_update(*update("a", 1, base=0))
    assert buffered.version_ == 0 and not buffered.publish_due(now=100.5)  # buffered: nothing changed
    buffered.handle_update(*update("b", 1, base=0))
    assert buffered.version_ == 1 and buffered.publish_due(now=100.5)
