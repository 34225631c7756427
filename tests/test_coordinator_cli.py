"""The coordinator's configuration parsing, Prometheus exporter and rate-limited rejection log."""

import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from coordinator.cli import parse_args, parse_hyperparameters
from coordinator.metrics import StatusCollector
from coordinator.session import RejectionLog
from coordinator.staleness import Hinge
from coordinator.status import build_status
from coordinator.strategies import FedBuff

REQUIRED = ["--broker", "mqtt://127.0.0.1:1883", "--fleet", "f", "--model", "sgd-classifier", "--n-features", "3",
            "--classes", "0,1"]


def test_hyperparameters_as_json_or_pairs():
    assert parse_hyperparameters('{"alpha": 0.001}') == {"alpha": 0.001}
    assert parse_hyperparameters("alpha=1e-4, loss=log_loss,fit_intercept=false,penalty=null") == {
        "alpha": 1e-4, "loss": "log_loss", "fit_intercept": False, "penalty": None}
    assert parse_hyperparameters("") == {}
    for bad, message in (("[1]", "JSON object"), ("{oops", "not a JSON object"), ("alpha", "not k=v")):
        with pytest.raises(ValueError, match=message):
            parse_hyperparameters(bad)


def test_flags_env_and_toml_build_the_strategy(tmp_path, monkeypatch):
    config = tmp_path / "c.toml"
    config.write_text('strategy = "fedbuff"\nbuffer-size = 3\nstaleness = "hinge:10,4"\nserver_lr = 0.5\n')
    monkeypatch.setenv("FEDMQ_BUFFER_SIZE", "4")
    args = parse_args([*REQUIRED, "--config", str(config), "--hyperparameters", "alpha=0.01"])
    assert isinstance(args.strategy_obj, FedBuff)
    assert args.strategy_obj.buffer_size == 4 and args.strategy_obj.server_lr == 0.5  # env beats TOML
    assert args.strategy_obj.staleness == Hinge(10, 4)
    assert args.spec.hyperparameters == {"alpha": 0.01} and args.spec.n_params == 4


@pytest.mark.parametrize("extra", [["--hyperparameters", "eta0=0", "--strategy", "fedasync"], ["--max-staleness", "-1"],
                                   ["--classes", "0"], ["--metrics-port", "70000"], ["--max-agent-rate", "0"]])
def test_bad_values_exit_2(extra, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*REQUIRED, *extra])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("fedmq-coordinator: error:")


def test_prometheus_exporter_reports_the_status():
    collector = StatusCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    assert generate_latest(registry) == b""  # nothing published yet
    collector.update(build_status(
        fleet="f", strategy="fedasync", version=7, published_version=7, accepted=5, rejected={"replay": 2},
        clipped=1, pending=0, staleness_sum=5, staleness_max=3, is_classifier=True, scores={"accuracy": 0.75},
        fleet_eval={"loss": 0.5}, agents=3, gaps=4, checkpoint_failing={"error": "disk full", "since": 9.0},
        started_at=0.0, now=10.0))
    text = generate_latest(registry).decode()
    for line in ('fedmq_model_version{fleet="f"} 7.0', 'fedmq_updates_accepted_total{fleet="f"} 5.0',
                 'fedmq_sequence_gaps_total{fleet="f"} 4.0', 'fedmq_checkpoint_failing{fleet="f"} 1.0',
                 'fedmq_checkpoint_failing_since_seconds{fleet="f"} 9.0',
                 'fedmq_updates_rejected_total{fleet="f",reason="replay"} 2.0',
                 'fedmq_eval_score{fleet="f",metric="accuracy"} 0.75', 'fedmq_fleet_eval{fleet="f",metric="loss"} 0.5',
                 'fedmq_staleness_max{fleet="f"} 3.0'):
        assert line in text.splitlines(), line


def test_rejections_logged_once_per_reason_per_period(caplog):
    rejections = RejectionLog(every=3600)
    with caplog.at_level(logging.WARNING, logger="coordinator.session"):
        for _ in range(50):
            rejections("replay", "fedmq/f/update/a")
        rejections("norm", "fedmq/f/update/b")
    assert [r.getMessage() for r in caplog.records] == [
        "rejected 1 update(s) as replay (latest on fedmq/f/update/a)",
        "rejected 1 update(s) as norm (latest on fedmq/f/update/b)",
    ]


BASE_ARGS = ["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--n-features", "4"]


@pytest.mark.parametrize("model, extra, expected", [
    ("sgd-classifier", [], True),  # devices log raw units: the linear models get the fleet's scaling
    ("sgd-regressor", [], True),
    ("sgd-one-class-svm", [], True),
    ("sgd-classifier", ["--no-feature-stats"], False),
    ("sgd-classifier", ["--dp-mode", "local", "--dp-clip", "1", "--dp-noise", "1"], False),
    ("sgd-classifier", ["--dp-mode", "local", "--dp-clip", "1", "--dp-noise", "1", "--feature-stats"], True),
    ("sgd-classifier", ["--strategy", "fedbuff", "--dp-mode", "central", "--dp-clip", "1", "--dp-noise", "1",
                        "--checkpoint-dir", "CKPT"], False),
    ("sgd-classifier", ["--strategy", "fedbuff", "--secure-aggregation"], False),
    ("sgd-classifier", ["--strategy", "fedbuff", "--secure-aggregation", "--feature-stats"], True),
    # 4 features: statistics of about 200 bytes fit a 1,024-byte packet limit; 10,000 features (400 kB) do not
    ("sgd-classifier", ["--max-packet-bytes", "1024"], True),
    ("sgd-classifier", ["--max-packet-bytes", "131072", "--n-features", "10000"], False),
])
def test_feature_stats_default_on_for_linear_models_off_under_privacy_flags(model, extra, expected, tmp_path, monkeypatch):
    monkeypatch.delenv("FEDMQ_FEATURE_STATS", raising=False)
    classes = ["--classes", "0,1"] if model == "sgd-classifier" else []
    extra = [str(tmp_path) if a == "CKPT" else a for a in extra]
    args = parse_args([*BASE_ARGS, "--model", model, *classes, *extra])
    assert args.feature_stats is expected


def test_feature_stats_off_from_the_environment_and_refused_under_central_dp(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDMQ_FEATURE_STATS", "false")
    assert parse_args([*BASE_ARGS, "--model", "sgd-regressor"]).feature_stats is False
    monkeypatch.delenv("FEDMQ_FEATURE_STATS")
    with pytest.raises(SystemExit):
        parse_args([*BASE_ARGS, "--model", "sgd-regressor", "--strategy", "fedbuff", "--dp-mode", "central",
                    "--dp-clip", "1", "--dp-noise", "1", "--checkpoint-dir", str(tmp_path), "--feature-stats"])
    assert "central DP refuses --feature-stats" in capsys.readouterr().err


@pytest.mark.parametrize("extra, expected", [
    ([], 2.0),  # on by default: one sign-flipping agent of 6 must not cost the fleet (issue 18)
    (["--norm-factor", "3"], 3.0),
    (["--norm-factor", "0"], None),  # off, as asked
    (["--dp-mode", "local", "--dp-clip", "1", "--dp-noise", "1"], 2.0),  # a rule over noised updates: post-processing
    (["--strategy", "fedbuff", "--dp-mode", "central", "--dp-clip", "1", "--dp-noise", "1", "--checkpoint-dir", "CKPT"],
     None),  # the DP clip bounds each update; a median of others' norms must not decide what is noised
    (["--strategy", "fedbuff", "--secure-aggregation"], None),  # no update is seen alone
])
def test_relative_norm_bound_on_by_default_off_under_central_dp_and_secure_aggregation(extra, expected, tmp_path):
    args = parse_args([*REQUIRED, *[str(tmp_path) if a == "CKPT" else a for a in extra]])
    assert args.norm.factor == expected


def test_an_explicit_norm_factor_is_refused_under_central_dp_and_a_negative_one_anywhere(tmp_path, capsys):
    central = ["--strategy", "fedbuff", "--dp-mode", "central", "--dp-clip", "1", "--dp-noise", "1",
               "--checkpoint-dir", str(tmp_path)]
    for extra, message in ((central + ["--norm-factor", "2"], "central DP refuses --norm-factor"),
                           (["--norm-factor", "-1"], "--norm-factor must be > 0, or 0 for off")):
        with pytest.raises(SystemExit):
            parse_args([*REQUIRED, *extra])
        assert message in capsys.readouterr().err
