"""edge_agent.agent: the protocol state machine, driven without threads or sockets."""

import json
import time

import numpy as np
import pytest
from sklearn.datasets import load_digits

from edge_agent.agent import Agent, offline_status
from edge_agent.data import ArraySource, CSVFile
from edge_agent.trainer import LocalTrainer
from protocol import codec
from protocol.messages import ModelMessage, decode_update, encode_model
from protocol.model_spec import ModelSpec
from protocol.tabular import write_csv
from protocol.topics import Topics

X, Y = load_digits(return_X_y=True)
TOPICS = Topics("t")
MULTI = ModelSpec("sgd-classifier", 64, tuple(range(10)))


def model_bytes(version, spec=MULTI, fleet="t", params=None):
    params = np.zeros(spec.n_params) if params is None else params
    return encode_model(ModelMessage(fleet, version, spec, params))


def make_agent(rows=200, codec_name="int8", **kwargs):
    return Agent("a1", TOPICS, ArraySource(X[:rows], Y[:rows]), LocalTrainer(random_state=0), codec_name, seed=0, **kwargs)


def test_only_newer_models_of_this_fleet_are_taken():
    agent = make_agent()
    assert agent.on_model(b"garbage") is False
    assert agent.on_model(b"") is False
    assert agent.on_model(model_bytes(9, fleet="other")) is False
    assert agent.model_ is None
    assert agent.on_model(model_bytes(3)) is True
    assert agent.on_model(model_bytes(2)) is False  # older
    assert agent.on_model(model_bytes(3)) is False  # equal: a retained redelivery
    assert agent.on_model(model_bytes(3, ModelSpec("sgd-regressor", 64))) is False  # equal, even with another spec
    assert agent.model_.version == 3 and agent.model_.spec == MULTI
    assert agent.on_model(model_bytes(4)) is True


def test_update_decodes_and_is_based_on_the_newest_model():
    agent = make_agent()
    assert agent.make_update() is None  # no model yet
    assert not agent.due()
    agent.on_model(model_bytes(3))
    assert agent.due()
    first = decode_update(agent.make_update())
    assert (first.base_version, first.n_samples) == (3, 200)
    assert first.delta.quant == "int8" and first.delta.n == MULTI.n_params
    assert set(first.metrics) == {"eval_loss", "eval_accuracy"}  # train_* only with LocalTrainer(train_metrics=True)
    assert not agent.due()  # already trained on version 3
    agent.on_model(model_bytes(7))
    agent.on_model(model_bytes(5))  # arrives late: ignored
    second = decode_update(agent.make_update())
    assert second.base_version == 7
    assert second.seq == first.seq + 1


def test_update_carries_the_trained_delta():
    agent = make_agent(codec_name="float32")
    agent.on_model(model_bytes(1))
    agent.due()
    update = decode_update(agent.make_update())
    local = np.concatenate([agent.trainer.estimator_.coef_.ravel(), agent.trainer.estimator_.intercept_])
    np.testing.assert_allclose(codec.decode(update.delta), local, rtol=1e-6, atol=1e-6)  # base was zeros


def test_seq_increases_strictly_across_restarts():
    before = time.time_ns() // 1000
    seqs = []
    for _ in range(3):  # three "processes" of the same device, one after the other
        agent = make_agent(rows=50)
        assert agent.seq_ >= before
        agent.on_model(model_bytes(1))
        for version in (1, 2):
            agent.on_model(model_bytes(version))
            seqs.append(decode_update(agent.make_update()).seq)
    assert all(b > a for a, b in zip(seqs, seqs[1:])), seqs


def test_nothing_to_send_keeps_seq_and_the_agent_alive():
    empty = Agent("a1", TOPICS, ArraySource(np.empty((0, 64)), np.empty(0)), LocalTrainer())
    empty.on_model(model_bytes(1))
    assert empty.make_update() is None
    agent = make_agent()
    seq = agent.seq_
    agent.on_model(model_bytes(1, ModelSpec("sgd-classifier", 8, (0, 1))))  # another feature count
    assert agent.due() and agent.make_update() is None
    agent.on_model(model_bytes(2, ModelSpec("sgd-classifier", 64, (10, 11))))  # no local row has these labels
    assert agent.make_update() is None
    assert agent.seq_ == seq and agent.updates_sent_ == 0
    agent.on_model(model_bytes(3))
    assert decode_update(agent.make_update()).seq == seq + 1  # and it carries on


def test_a_new_spec_resets_error_feedback():
    agent = make_agent(codec_name="topk:0.05+int4")
    agent.on_model(model_bytes(1))
    agent.make_update()
    assert np.any(agent.feedback.residual_)
    agent.on_model(model_bytes(2, ModelSpec("sgd-classifier", 64, (0, 1))))
    assert agent.feedback.residual_ is None


def test_status_is_json_with_every_field():
    agent = make_agent(codec_name="topk:0.05+int4")
    status = json.loads(json.dumps(agent.status()))
    assert status["state"] == "online" and status["version"] is None and status["last_update_time"] is None
    agent.on_model(model_bytes(4))
    assert agent.status()["state"] == "online"  # a model to train on
    agent.due()
    agent.make_update()
    status = json.loads(json.dumps(agent.status(), allow_nan=False))
    assert set(status) == {"agent", "state", "since", "version", "model_version", "updates_sent", "samples", "codec",
                           "last_update_time", "missing", "scaled", "time"}  # the round's metrics are in the update
    assert status["agent"] == "a1" and status["state"] == "idle"
    assert (status["version"], status["model_version"], status["updates_sent"]) == (4, 4, 1)
    assert status["samples"] == 200 and status["codec"] == "topk:0.05+int4"
    assert abs(status["last_update_time"] - time.time()) < 60 and status["since"] <= status["time"]
    assert not agent.status_changed()  # just published
    agent.on_model(model_bytes(5))
    assert agent.status()["state"] == "online" and not agent.status_changed()  # the round cycle is one phase
    agent.due()
    agent.make_update()
    assert not agent.status_changed()
    assert agent.status("offline")["state"] == "offline"
    assert offline_status("a1") == {"agent": "a1", "state": "offline"}


def test_min_new_samples_gates_training(tmp_path):
    data = tmp_path / "d.csv"
    write_csv(data, X[:50], Y[:50])
    agent = Agent("a1", TOPICS, CSVFile(data), LocalTrainer(), min_new_samples=10)
    agent.on_model(model_bytes(1))
    assert agent.due()  # first round: whatever there is
    agent.make_update()
    agent.on_model(model_bytes(2))
    assert not agent.due()  # newer model, but no new rows
    with data.open("a") as fh:
        for row, label in zip(X[50:60], Y[50:60]):
            fh.write(",".join(map(str, row)) + f",{label}\n")
    assert agent.due()


def test_train_every_retrains_on_new_rows_without_a_new_model(tmp_path):
    data = tmp_path / "d.csv"
    write_csv(data, X[:50], Y[:50])
    agent = Agent("a1", TOPICS, CSVFile(data), LocalTrainer(), train_every=10.0)
    agent.on_model(model_bytes(1))
    assert agent.due(now=agent.last_train_at_ + 100)
    agent.make_update()
    assert not agent.due(now=agent.last_train_at_ + 100)  # no new rows, no new model
    with data.open("a") as fh:
        fh.write(",".join(map(str, X[60])) + f",{Y[60]}\n")
    assert not agent.due(now=agent.last_train_at_ + 1)  # too soon
    assert agent.due(now=agent.last_train_at_ + 100)


@pytest.mark.parametrize("bad_id", ["a/b", "a+", "", "x" * 65])
def test_agent_id_must_be_a_topic_level(bad_id):
    with pytest.raises(ValueError, match="invalid agent id"):
        Agent(bad_id, TOPICS, ArraySource(X[:5], Y[:5]), LocalTrainer())
