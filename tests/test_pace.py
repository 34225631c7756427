"""Pace steering (protocol/pace.py): the math, the model message's field, and the agent obeying it."""

import random
import time

import msgpack
import numpy as np
import pytest
from sklearn.datasets import load_digits

from coordinator.presence import Presence
from coordinator.server import Coordinator
from coordinator.strategies import FedAsync
from coordinator.validation import UpdateValidator
from edge_agent.agent import Agent
from edge_agent.data import ArraySource
from edge_agent.trainer import LocalTrainer
from protocol.errors import ProtocolError
from protocol.messages import ModelMessage, decode_model, encode_model
from protocol.model_spec import ModelSpec
from protocol.pace import MAX_JITTER, Pace, Steering, bounded, steer
from protocol.topics import Topics

X, Y = load_digits(return_X_y=True)
TOPICS = Topics("t")
SPEC = ModelSpec("sgd-classifier", 64, tuple(range(10)))


def model(version: int = 1, pace: Pace | None = None) -> bytes:
    return encode_model(ModelMessage("t", version, SPEC, np.zeros(SPEC.n_params), pace=pace))


def test_the_interval_divides_the_target_among_the_agents_within_bounds():
    assert steer(4, 2.0).interval == 2.0
    assert steer(12, 2.0).interval == 6.0  # three times the fleet, three times the interval: the same rate
    for n in (10, 100, 1000):
        assert n / steer(n, 5.0, max_interval=1e6).interval == pytest.approx(5.0)
    assert steer(1, 10.0, min_interval=1.0).interval == 1.0  # a small fleet is not driven faster than min
    assert steer(0, 10.0, min_interval=1.0).interval == 1.0
    assert steer(10**6, 1.0, max_interval=600).interval == 600  # a huge fleet: the ceiling, rate above target
    assert steer(8, 2.0, jitter=0.2).jitter == 0.2


@pytest.mark.parametrize("args", [(4, 0.0), (4, -1.0), (4, float("nan")), (4, 1.0, 5.0, 1.0), (4, 1.0, 0.0, 1.0)])
def test_impossible_settings_are_refused(args):
    n, target, *bounds = args
    with pytest.raises(ValueError):
        steer(n, target, **dict(zip(("min_interval", "max_interval"), bounds)))
    with pytest.raises(ValueError):
        Steering(target, *bounds) if bounds else Steering(target)
    with pytest.raises(ValueError):
        Steering(1.0, jitter=MAX_JITTER + 0.01)


def test_waits_spread_around_the_interval_with_the_interval_as_mean():
    rng = random.Random(1)
    waits = [Pace(6.0, 0.5).wait(rng) for _ in range(4000)]
    assert 3.0 <= min(waits) and max(waits) <= 9.0
    assert np.mean(waits) == pytest.approx(6.0, rel=0.03)
    assert np.std(waits) > 1.5  # spread: a fleet that started together does not stay in step
    assert Pace(6.0, 0.0).wait(rng) == 6.0


def test_the_model_message_carries_the_pace_and_old_payloads_have_none():
    got = decode_model(model(pace=Pace(6.0, 0.25)))
    assert got.pace == Pace(6.0, 0.25)
    assert decode_model(model()).pace is None
    assert "pace" not in msgpack.unpackb(model())  # unsteered: the message is as before


def test_an_agent_that_ignores_the_field_still_decodes_the_model():
    # an old agent's decoder reads the keys it knows: the steered message only adds one map key
    wire = msgpack.unpackb(model(pace=Pace(6.0)))
    assert set(wire) - set(msgpack.unpackb(model())) == {"pace"}
    assert decode_model(msgpack.packb({k: v for k, v in wire.items() if k != "pace"})).version == 1


@pytest.mark.parametrize("bad", [{"interval": "6"}, {"interval": float("nan")}, {"interval": float("inf")},
                                 {"jitter": 0.5}, {"interval": 1, "extra": 1}, [6.0, 0.5], {"interval": True}])
def test_a_malformed_pace_is_a_protocol_error(bad):
    wire = msgpack.unpackb(model())
    wire["pace"] = bad
    with pytest.raises(ProtocolError):
        decode_model(msgpack.packb(wire))


def test_the_device_bounds_absurd_values():
    assert bounded(Pace(1e12, 0.5), max_interval=600) == Pace(600, 0.5)
    assert bounded(Pace(6.0, 7.0)).jitter == MAX_JITTER  # never a wait of zero or less
    assert bounded(Pace(6.0, -3.0)).jitter == 0.0
    assert bounded(Pace(-5.0)) is None and bounded(Pace(0.0)) is None  # no steering, not "train constantly"
    assert bounded(Pace(6.0), max_interval=0) is None  # fedmq-agent --max-pace 0: ignore the pace
    assert bounded(None) is None


def make_agent(agent_id: str = "a1", **kwargs) -> Agent:
    return Agent(agent_id, TOPICS, ArraySource(X[:100], Y[:100]), LocalTrainer(random_state=0), "int8", seed=0, **kwargs)


def test_the_agent_trains_no_more_often_than_the_pace_whatever_train_every_says():
    agent = make_agent(train_every=0.01)
    assert agent.on_model(model(1, Pace(10.0, 0.5)))
    assert agent.due(now=agent.next_round_at_)  # the first round: after a fraction of the interval (below)
    assert agent.make_update() is not None
    start = agent.last_train_at_
    assert 5.0 <= agent.next_round_at_ - start <= 15.0
    agent.on_model(model(2, Pace(10.0, 0.5)))
    agent.new_samples_ = 5
    assert not agent.due(now=start + 4.9)  # newer model, new rows, train_every long passed: the pace holds it
    assert agent.due(now=agent.next_round_at_ + 0.01)
    assert agent.status()["pace"] == 10.0


def test_a_fleet_starting_together_spreads_its_first_rounds_over_one_interval():
    """Cold start: 200 agents get their first paced model at once; their first rounds fall uniformly
    over one interval (10 s) instead of all at once."""
    waits = []
    for i in range(200):
        agent = make_agent(agent_id=f"a{i}")
        start = time.monotonic()
        agent.on_model(model(1, Pace(10.0, 0.5)))
        waits.append(agent.next_round_at_ - start)
        assert agent.due(now=agent.next_round_at_) and (waits[-1] < 0.01 or not agent.due(now=start))
    assert all(-0.1 <= w < 10.0 for w in waits)
    counts = np.histogram(waits, bins=5, range=(0.0, 10.0))[0]
    assert counts.min() >= 20, counts  # each fifth of the interval gets its share (40 expected)
    plain = make_agent()
    plain.on_model(model(1))
    assert plain.due(now=time.monotonic())  # unsteered: the first round at once, as before


def test_the_agent_caps_a_hostile_pace_and_unsteered_it_is_unchanged():
    agent = make_agent(max_pace=30.0)
    agent.on_model(model(1, Pace(1e15, 0.5)))
    agent.make_update()
    assert agent.next_round_at_ - agent.last_train_at_ <= 30.0 * 1.5
    agent.on_model(model(2, Pace(1e15, 0.5)))
    assert agent.due(now=agent.last_train_at_ + 45.1)
    plain = make_agent()
    plain.on_model(model(1))
    plain.make_update()
    plain.on_model(model(2))
    assert plain.pace is None and plain.due(now=time.monotonic())  # no pace: every newer model, as before


def coordinator(steering: Steering | None) -> Coordinator:
    return Coordinator(TOPICS, SPEC, FedAsync(), UpdateValidator(TOPICS, SPEC.n_params),
                       presence=Presence(TOPICS), steering=steering)


def test_the_coordinator_paces_by_the_agents_online():
    core = coordinator(Steering(2.0, min_interval=1.0))
    assert decode_model(core.model_payload()).pace == Pace(1.0, 0.5)  # nobody online yet: the floor
    for i in range(12):
        core.handle_agent_status(TOPICS.agent_status(f"a{i}"), b'{"state": "online"}')
    assert decode_model(core.model_payload()).pace == Pace(6.0, 0.5)
    assert core.status()["pace"] == {"interval": 6.0, "jitter": 0.5, "agents_online": 12}
    for i in range(8):
        core.handle_agent_status(TOPICS.agent_status(f"a{i}"), b'{"state": "offline"}')
    assert decode_model(core.model_payload()).pace.interval == 2.0
    from prometheus_client import CollectorRegistry, generate_latest

    from coordinator.metrics import StatusCollector

    collector, registry = StatusCollector(), CollectorRegistry()
    registry.register(collector)
    collector.update(core.status())
    text = generate_latest(registry).decode()
    assert 'fedmq_pace_interval_seconds{fleet="t"} 2.0' in text and 'fedmq_pace_agents_online{fleet="t"} 4.0' in text
    unsteered = coordinator(None)
    assert decode_model(unsteered.model_payload()).pace is None and "pace" not in unsteered.status()
    with pytest.raises(ValueError):
        Coordinator(TOPICS, SPEC, FedAsync(), UpdateValidator(TOPICS, SPEC.n_params), steering=Steering(2.0))


REQUIRED = ["--broker", "mqtt://127.0.0.1:1883", "--fleet", "t", "--model", "sgd-classifier", "--classes", "0,1", "--n-features", "2"]


@pytest.mark.parametrize("extra", [["--target-updates-per-s", "-1"], ["--target-updates-per-s", "nan"],
                                   ["--target-updates-per-s", "2", "--pace-min-interval", "0"],
                                   ["--target-updates-per-s", "2", "--pace-min-interval", "9", "--pace-max-interval", "3"],
                                   ["--target-updates-per-s", "2", "--pace-jitter", "1.5"],
                                   ["--target-updates-per-s", "2", "--strategy", "fedbuff", "--secure-aggregation"]])
def test_bad_pace_flags_are_one_line_errors(extra, capsys):
    from coordinator.cli import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args([*REQUIRED, *extra])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("fedmq-coordinator: error:") and "pace" in last, last


def test_pace_flags_build_the_steering_and_turn_presence_on():
    from coordinator.cli import build_coordinator, parse_args

    args = parse_args([*REQUIRED, "--strategy", "fedasync", "--target-updates-per-s", "3", "--pace-jitter", "0.2"])
    core = build_coordinator(args)
    assert core.steering == Steering(3.0, 1.0, 600.0, 0.2) and core.presence is not None
    assert parse_args(REQUIRED).steering is None
