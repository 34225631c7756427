"""The edge agent: trainer, error feedback, data sources, state machine, CLI errors."""

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from edge_agent import cli
from edge_agent.agent import Agent
from edge_agent.data import CallableSource, CSVDirectory, CSVFile
from edge_agent.error_feedback import ErrorFeedback
from edge_agent.trainer import LocalTrainer
from fleet import TopicWatcher, spawn, stop
from simulation.mosquitto import free_port
from protocol import codec
from protocol.messages import ModelMessage, decode_update, encode_model
from protocol.model_spec import ModelSpec
from protocol.tabular import DataError, write_csv
from protocol.topics import Topics

X, Y = load_digits(return_X_y=True)
TOPICS = Topics("t")
MULTI = ModelSpec("sgd-classifier", 64, tuple(range(10)))


def model(spec=MULTI, version=1, params=None):
    return ModelMessage("t", version, spec, np.zeros(spec.n_params) if params is None else params)


@pytest.mark.parametrize(
    "spec, y",
    [
        (MULTI, Y),
        (ModelSpec("sgd-classifier", 64, (0, 1), {"loss": "log_loss"}), np.where(Y < 5, 0, 1)),
        (ModelSpec("sgd-regressor", 64, (), {"eta0": 1e-4}), Y.astype(float)),
    ],
)
def test_trainer_returns_local_minus_global(spec, y):
    start = np.random.default_rng(0).normal(scale=0.01, size=spec.n_params)
    trainer = LocalTrainer(local_epochs=2, batch_size=64, random_state=0)
    result = trainer.train(model(spec, params=start), X, y)
    local = start + result.delta
    np.testing.assert_allclose(local, np.concatenate([trainer.estimator_.coef_.ravel(), trainer.estimator_.intercept_]))
    assert result.n_samples == len(y)
    assert "eval_loss" in result.metrics
    if spec.is_classifier:
        assert 0 <= result.metrics["eval_accuracy"] <= 1
        assert result.metrics["train_accuracy"] > 0.8
    else:
        assert result.metrics["train_r2"] > 0.3  # a linear fit of digit labels is weak


def test_trainer_skips_unknown_labels_and_checks_features():
    spec = ModelSpec("sgd-classifier", 64, (0, 1))
    result = LocalTrainer(random_state=0).train(model(spec), X, Y)
    assert result.n_samples == int(np.isin(Y, (0, 1)).sum())
    with pytest.raises(ValueError, match="features"):
        LocalTrainer().train(model(), X[:, :10], Y)


def test_error_feedback_loses_nothing():
    rng = np.random.default_rng(0)
    ef = ErrorFeedback("topk:0.1+int4", rng)
    deltas = [rng.normal(size=200) for _ in range(20)]
    sent = sum(codec.decode(ef.encode(d)).astype(np.float64) for d in deltas)
    np.testing.assert_allclose(sent + ef.residual_, sum(deltas), atol=1e-4)


def test_agent_state_machine(tmp_path):
    data = tmp_path / "d.csv"
    write_csv(data, X[:200], Y[:200])
    source = CSVFile(data)
    agent = Agent("a1", TOPICS, source, LocalTrainer(random_state=0), "int8", seed=0)
    assert not agent.due()  # no model yet
    assert agent.on_model(b"garbage") is False
    assert agent.on_model(encode_model(model(version=3)))
    assert agent.on_model(encode_model(model(version=2))) is False  # older
    assert agent.on_model(encode_model(ModelMessage("other", 9, MULTI, np.zeros(650)))) is False  # other fleet
    assert agent.due()
    first = decode_update(agent.make_update(), fleet="t")
    assert (first.agent_id, first.base_version, first.n_samples) == ("a1", 3, 200)
    assert not agent.due()  # already trained on version 3
    agent.on_model(encode_model(model(version=4)))
    second = decode_update(agent.make_update())
    assert second.seq == first.seq + 1 and second.base_version == 4
    status = json.loads(json.dumps(agent.status()))
    assert status["agent"] == "a1" and status["updates_sent"] == 2 and status["version"] == 4


def test_min_new_samples_gates_training(tmp_path):
    data = tmp_path / "d.csv"
    write_csv(data, X[:50], Y[:50])
    agent = Agent("a1", TOPICS, CSVFile(data), LocalTrainer(), min_new_samples=10)
    agent.on_model(encode_model(model(version=1)))
    assert agent.due()  # first round: whatever there is
    agent.make_update()
    agent.on_model(encode_model(model(version=2)))
    assert not agent.due()  # newer model, but no new rows
    with data.open("a") as fh:
        for row, label in zip(X[50:60], Y[50:60]):
            fh.write(",".join(map(str, row)) + f",{label}\n")
    assert agent.due()


def test_data_sources(tmp_path):
    write_csv(tmp_path / "a.csv", X[:5], Y[:5])
    source = CSVFile(tmp_path / "a.csv", window=3)
    assert source.poll() == 5 and source.poll() == 0
    assert len(source.data()[1]) == 3  # bounded window keeps the newest
    directory = CSVDirectory(tmp_path)
    assert directory.poll() == 5
    write_csv(tmp_path / "b.csv", X[5:8], Y[5:8])
    assert directory.poll() == 3
    with pytest.raises(DataError):
        CallableSource("nonexistent_module_xyz:f")
    src = CallableSource("numpy:eye")
    with pytest.raises(DataError, match="failed"):
        src.poll()


@pytest.mark.parametrize(
    "content, args, message",
    [
        (None, [], "no such file"),
        ("a,b\n1,2\n", [], "no column 'label'"),
        ("f0,label\n1,x\n", [], "is not a number"),
    ],
)
def test_cli_data_errors_exit_2(tmp_path, capsys, content, args, message):
    path = tmp_path / "d.csv"
    if content is not None:
        path.write_text(content)
    code = cli.main(["--broker", "mqtt://127.0.0.1:1", "--fleet", "t", "--id", "a", "--data", str(path), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_unreachable_broker_exit_1(tmp_path, capsys):
    write_csv(tmp_path / "d.csv", X[:5], Y[:5])
    code = cli.main(["--broker", f"mqtt://127.0.0.1:{free_port()}", "--fleet", "t", "--id", "a", "--data", str(tmp_path / "d.csv")])
    assert code == 1
    assert "cannot reach broker" in capsys.readouterr().err


def test_cli_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--fleet", "t", "--id", "a", "--data", "x.csv"])
    assert info.value.code == 2 and "--broker is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--broker", "mqtt://h", "--fleet", "t", "--id", "a/b", "--data", "x.csv"])
    with pytest.raises(SystemExit):
        cli.main(["--broker", "mqtt://h", "--fleet", "t", "--id", "a", "--data", "x.csv", "--codec", "int3"])


def test_agent_process_sends_update_and_goes_offline(tmp_path, mosquitto):
    write_csv(tmp_path / "d.csv", X[:100], Y[:100])
    watcher = TopicWatcher(mosquitto.port, TOPICS.everything)
    watcher.client.publish(TOPICS.model, encode_model(model(version=5)), qos=1, retain=True).wait_for_publish(5)
    proc = spawn("edge_agent", "--broker", mosquitto.url, "--fleet", "t", "--id", "pi-1", "--data", tmp_path / "d.csv",
                 "--codec", "int4", log=tmp_path / "agent.log")
    try:
        payload = watcher.wait_for(lambda: watcher.latest.get(TOPICS.update("pi-1")), timeout=30, what="an update")
        update = decode_update(payload, fleet="t")
        assert update.base_version == 5 and update.delta.quant == "int4"
        watcher.wait_for(lambda: (watcher.json(TOPICS.agent_status("pi-1")) or {}).get("updates_sent") == 1,
                         timeout=10, what="online status after the update")
    finally:
        assert stop(proc) == 0
    watcher.wait_for(lambda: watcher.json(TOPICS.agent_status("pi-1"))["state"] == "offline", timeout=10, what="offline status")
    watcher.close()
