"""Agent liveness without a broker: an update may be lost where exactly-once cannot reach, so
an agent sends afresh after --resend-after, or at once when the coordinator restarted."""

import numpy as np
from sklearn.datasets import load_digits

from edge_agent.agent import ERROR, IDLE, Agent
from edge_agent.data import ArraySource
from edge_agent.trainer import LocalTrainer
from protocol.messages import ModelMessage, decode_update, encode_model
from protocol.model_spec import ModelSpec
from protocol.topics import Topics

X, Y = load_digits(return_X_y=True)
TOPICS = Topics("t")
SPEC = ModelSpec("sgd-classifier", 64, tuple(range(10)))


def model(version, started_at=1000.0, spec=SPEC):
    return encode_model(ModelMessage("t", version, spec, np.zeros(spec.n_params), started_at=started_at))


def agent(**kwargs):
    return Agent("a1", TOPICS, ArraySource(X[:100], Y[:100]), LocalTrainer(random_state=0), seed=0, **kwargs)


def test_no_newer_model_within_the_bound_means_train_again():
    a = agent(resend_after=10.0)
    a.on_model(model(3))
    assert a.due() and decode_update(a.make_update()).base_version == 3
    sent_at = a.last_train_at_
    assert a.state == IDLE and not a.due(sent_at + 9.9)
    bound = 10.0 * a.resend_jitter
    assert 1.0 <= a.resend_jitter < 1.5
    assert not a.due(sent_at + bound - 0.01) and a.due(sent_at + bound + 1e-6)
    first, again = a.seq_, decode_update(a.make_update())
    assert again.base_version == 3 and again.seq == first + 1  # a fresh update, not the old one


def test_jitter_spreads_a_fleet():
    jitters = {Agent(f"a{i}", TOPICS, ArraySource(X[:10], Y[:10]), LocalTrainer()).resend_jitter for i in range(20)}
    assert len(jitters) == 20


def test_a_coordinator_restart_means_send_afresh_at_once():
    a = agent(resend_after=None)
    a.on_model(model(3, started_at=1000.0))
    a.make_update()
    assert not a.due(a.last_train_at_ + 1e6)  # no timer: only a newer model, or a restart
    assert a.on_model(model(3, started_at=1000.0)) is False  # the same coordinator republishing
    assert a.on_model(model(3, started_at=2000.0)) is True
    assert a.due() and not a.due()  # once
    a.make_update()
    assert a.updates_sent_ == 2


def test_an_untrainable_model_is_an_error_once_per_version_then_a_good_one_clears_it():
    a = agent(resend_after=1.0)
    wrong = ModelSpec("sgd-classifier", 3, (0, 1))
    a.on_model(model(1, spec=wrong))
    assert a.due() and a.make_update() is None
    assert a.state == ERROR and "feature" in a.status()["error"]
    assert not a.due(a.last_train_at_ + 100)  # neither retried nor resent on this version
    a.on_model(model(2))
    assert a.due() and a.make_update() is not None and a.state == IDLE and "error" not in a.status()
