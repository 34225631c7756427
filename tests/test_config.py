"""Layered configuration: flags > FEDMQ_* environment > TOML file > defaults."""

import argparse

import pytest

from protocol.config import add_config_option, parse_layered
from protocol.transport import BrokerSettings


def _parser():
    p = argparse.ArgumentParser(prog="t")
    add_config_option(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--codec", choices=("int8", "int4"), default="int8")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--fleet")
    return p


def test_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('batch-size = 8\ncodec = "int4"\nfleet = "from-file"\nverbose = true\n')
    monkeypatch.setenv("FEDMQ_FLEET", "from-env")
    ns = parse_layered(_parser(), ["--config", str(cfg), "--batch-size", "64"])
    assert (ns.batch_size, ns.codec, ns.fleet, ns.verbose) == (64, "int4", "from-env", True)
    ns = parse_layered(_parser(), [])
    assert (ns.batch_size, ns.codec, ns.fleet, ns.verbose) == (32, "int8", "from-env", False)


@pytest.mark.parametrize(
    "toml, env, message",
    [
        ("batch_size = 'x'", {}, "invalid literal"),
        ("codec = 'int3'", {}, "not one of"),
        ("unknown = 1", {}, "unknown option"),
        ("batch_size = [1]", {}, "single value"),
        ("= broken", {}, "cannot read config"),
        ("", {"FEDMQ_VERBOSE": "maybe"}, "true or false"),
        ("", {"FEDMQ_BATCH_SIZE": "many"}, "FEDMQ_BATCH_SIZE"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, monkeypatch, capsys, toml, env, message):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as info:
        parse_layered(_parser(), ["--config", str(cfg)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_config_file(capsys):
    with pytest.raises(SystemExit):
        parse_layered(_parser(), ["--config", "/nonexistent.toml"])
    assert "config file not found" in capsys.readouterr().err


def test_broker_urls(tmp_path, monkeypatch):
    s = BrokerSettings.from_url("mqtt://broker")
    assert (s.host, s.port, s.tls) == ("broker", 1883, False)
    assert BrokerSettings.from_url("mqtts://broker").port == 8883
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    assert BrokerSettings.from_url("mqtt://a1@h:1", password_file=str(pw)).password == "s3cret"
    monkeypatch.setenv("FEDMQ_PASSWORD", "envpw")
    assert BrokerSettings.from_url("mqtt://h").password == "envpw"
    for bad, kwargs in [
        ("http://h", {}),
        ("mqtt://u:pw@h", {}),
        ("mqtt://h:99999", {}),
        ("mqtts://h", {"ca_file": "/nonexistent"}),
        ("mqtt://h", {"password_file": "/nonexistent"}),
        ("mqtt://h", {"mqtt_version": "4"}),
    ]:
        with pytest.raises(ValueError):
            BrokerSettings.from_url(bad, **kwargs)


def test_the_tiers_tools_layer_their_options_as_every_fedmq_tool(tmp_path, monkeypatch):
    """The scale-out tier's root, worker, tier-up and auth service took flags only (their required ones on the command
    line), against the rule every other tool follows; seen red with their plain parse_args: no --config option."""
    from tier import auth, root, up, worker
    from tier.cli_args import CLUSTER_REQUIRED

    cfg = tmp_path / "tier.toml"
    cfg.write_text('fleet = "from-file"\nn-features = 9\nmodel = "sgd-regressor"\nbuffer-size = 7\n')
    monkeypatch.setenv("FEDMQ_NATS", "nats://127.0.0.1:4222")
    monkeypatch.setenv("FEDMQ_MQTT", "mqtt://127.0.0.1:1883")
    monkeypatch.setenv("FEDMQ_FLEET", "from-env")
    ns = parse_layered(root.build_parser(), ["--config", str(cfg), "--buffer-size", "3"],
                       CLUSTER_REQUIRED + ("model", "n_features"))
    assert (ns.nats, ns.fleet, ns.model, ns.n_features, ns.buffer_size) == (
        "nats://127.0.0.1:4222", "from-env", "sgd-regressor", 9, 3)
    ns = parse_layered(worker.build_parser(), [], CLUSTER_REQUIRED)
    assert (ns.mqtt, ns.fleet) == ("mqtt://127.0.0.1:1883", "from-env")
    monkeypatch.setenv("FEDMQ_WORKERS", "3")
    assert parse_layered(up.build_parser(), []).workers == 3
    monkeypatch.setenv("FEDMQ_SESSION_S", "30")
    assert parse_layered(auth.build_parser(), []).session_s == 30.0
    monkeypatch.delenv("FEDMQ_NATS")
    with pytest.raises(SystemExit):
        parse_layered(worker.build_parser(), [], CLUSTER_REQUIRED)
