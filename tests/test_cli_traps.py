"""The first-hour traps of the command line (issue 22 point 8), each one clear line.

--password is never taken for --password-file nor echoed; --data DIR names --data-dir;
--classes must be numeric (CSV labels are); a URL without a port says the port it uses;
TLS to a plain port and plain MQTT to a TLS port say what to use, within 2 s, against a real
mosquitto with broker/'s TLS listener; a CSV without rows warns.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest

from coordinator.cli import main as coordinator_main
from edge_agent.cli import main as agent_main
from fleet import ROOT
from monitor.cli import main as monitor_main
from protocol.transport import BrokerError, BrokerSettings, connect, make_client
from simulation.mosquitto import free_port
from test_broker_acl import make_credentials, start_production_broker

SECRET = "hunter2-secret"
BASE = {
    "agent": (agent_main, ["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--id", "a", "--data", "x.csv"]),
    "coordinator": (coordinator_main, ["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--model", "sgd-classifier"]),
    "monitor": (monitor_main, ["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--once"]),
}


def run(tool: str, extra: list[str], capsys) -> tuple[int, str]:
    main, args = BASE[tool]
    try:
        code = main([*args, *extra])
    except SystemExit as exc:  # fedmq-coordinator's main lets argparse's exit through
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("tool", sorted(BASE))
@pytest.mark.parametrize("given", [["--password", SECRET], [f"--password={SECRET}"], ["--pass", SECRET],
                                   ["--password-f", SECRET]])
def test_a_password_flag_is_refused_and_never_echoed(tool, given, capsys):
    code, err = run(tool, given, capsys)
    assert code == 2 and SECRET not in err and len(err.strip().splitlines()) == 1, err
    assert "--password-file" in err or "unrecognized" in err, err


def test_data_naming_a_directory_names_data_dir(tmp_path, capsys):
    code = agent_main(["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--id", "a", "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "is a directory" in err and f"--data-dir {tmp_path}" in err, err


def test_string_classes_are_refused(capsys):
    code, err = run("coordinator", ["--classes", "cat,dog"], capsys)
    assert code == 2 and "'cat'" in err and "numbers" in err and len(err.strip().splitlines()) == 1, err


def test_a_url_without_a_port_says_the_port_it_uses(caplog):
    settings = BrokerSettings.from_url("mqtts://127.0.0.1")
    assert settings.port == 8883 and not settings.port_given
    assert BrokerSettings.from_url(f"mqtt://127.0.0.1:{free_port()}").port_given
    with caplog.at_level(logging.WARNING, logger="protocol.transport"), pytest.raises(BrokerError):
        connect(make_client(settings, "no-port"), settings, timeout=5)
    assert any("names no port: connecting to mqtts://127.0.0.1:8883" in r.getMessage() for r in caplog.records), \
        caplog.text


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    work = tmp_path_factory.mktemp("tls")
    creds = make_credentials(work / "creds", "a1", fleet="f")
    broker = start_production_broker(work / "broker", creds)
    broker.creds = creds
    yield broker
    broker.stop()


@pytest.mark.parametrize("case", ["tls-to-plain", "plain-to-tls"])
def test_tls_and_plain_mismatches_say_what_to_use_within_2_s(tls_broker, case):
    creds = tls_broker.creds
    if case == "tls-to-plain":
        url, ca, expect = f"mqtts://127.0.0.1:{tls_broker.plain_port}", str(creds / "certs" / "ca.crt"), "mqtt://"
    else:
        url, ca, expect = f"mqtt://127.0.0.1:{tls_broker.tls_port}", None, "mqtts://"
    settings = BrokerSettings.from_url(url, ca_file=ca, username="a1",
                                       password_file=str(creds / "secrets" / "a1.password"))
    started = time.monotonic()
    with pytest.raises(BrokerError) as err:
        connect(make_client(settings, "mismatch"), settings, timeout=30)
    took = time.monotonic() - started
    message = str(err.value)
    assert expect in message and ("does not speak TLS" in message or "speaks TLS" in message), message
    assert took < 2, f"{case}: said after {took:.1f} s (the connect timeout is 30 s)"


def test_a_csv_without_rows_warns(tmp_path):
    empty, header_only = tmp_path / "empty.csv", tmp_path / "header.csv"
    empty.write_text("")
    header_only.write_text("f1,f2,label\n")
    for path in (empty, header_only):
        out = subprocess.run([sys.executable, "-m", "edge_agent", "--broker", f"mqtt://127.0.0.1:{free_port()}",
                              "--fleet", "f", "--id", "a", "--data", str(path), "--connect-timeout", "1"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 1 and f"{path} has no data rows yet" in out.stderr, out.stderr
