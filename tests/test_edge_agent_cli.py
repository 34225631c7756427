"""fedmq-agent's command line: usage, configuration and data errors, an unreachable broker."""

import numpy as np
import pytest

from edge_agent import cli
from protocol.tabular import write_csv
from simulation.mosquitto import free_port

BASE = ["--fleet", "t", "--id", "a"]


def run(capsys, *argv):
    code = cli.main(list(map(str, argv)))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "content, extra, message",
    [
        (None, [], "no such file"),
        ("a,b\n1,2\n", [], "no column 'label'"),
        ("f0,label\n1,x\n", [], "line 2, column 'label': 'x' is not a number"),
        ("f0,y\n1,2\n", [], "no column 'label' (columns: f0, y)"),  # the default label column...
        ("f0,y\n1,oops\n", ["--label-column", "y"], "'oops' is not a number"),  # ...unless told otherwise
    ],
)
def test_data_errors_exit_2_with_one_clear_line(tmp_path, capsys, content, extra, message):
    path = tmp_path / "d.csv"
    if content is not None:
        path.write_text(content)
    code, err = run(capsys, "--broker", "mqtt://127.0.0.1:1", *BASE, "--data", path, *extra)
    assert code == 2
    assert message in err and str(path) in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_unreachable_broker_exits_1_with_one_line(tmp_path, capsys):
    write_csv(tmp_path / "d.csv", np.eye(3), np.arange(3))
    port = free_port()
    code, err = run(capsys, "--broker", f"mqtt://127.0.0.1:{port}", *BASE, "--data", tmp_path / "d.csv",
                    "--connect-timeout", "2")
    assert code == 1
    assert err.startswith("fedmq-agent: error: cannot reach broker at mqtt://127.0.0.1:") and f":{port}" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (BASE + ["--data", "x.csv"], "--broker is required"),
        (["--broker", "mqtt://h", "--id", "a", "--data", "x.csv"], "--fleet is required"),
        (["--broker", "mqtt://h", *BASE], "exactly one of --data"),
        (["--broker", "mqtt://h", "--fleet", "t", "--id", "a/b", "--data", "x.csv"], "invalid agent id"),
        (["--broker", "mqtt://h", *BASE, "--data", "x.csv", "--codec", "int3"], "unknown codec 'int3'"),
        (["--broker", "mqtt://h", *BASE, "--data", "x.csv", "--codec", "topk:2+int4"], "top-k fraction"),
        (["--broker", "http://h", *BASE, "--data", "x.csv"], "mqtt://HOST"),
        (["--broker", "mqtt://h", *BASE, "--data", "x.csv", "--local-epochs", "0"], "--local-epochs"),
        (["--broker", "mqtt://h", *BASE, "--data", "x.csv", "--status-interval", "-1"], "--status-interval"),
        (["--broker", "mqtt://h", *BASE, "--data", "x.csv", "--batch-size", "many"], "invalid int value"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, message):
    code, err = run(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_environment_and_config_file_fill_options(tmp_path, capsys, monkeypatch):
    """Flags > FEDMQ_* > --config: here the data file comes from the environment and is missing."""
    config = tmp_path / "agent.toml"
    config.write_text('broker = "mqtt://127.0.0.1:1"\nfleet = "t"\nid = "a"\ndata = "from-config.csv"\n')
    monkeypatch.setenv("FEDMQ_DATA", str(tmp_path / "from-env.csv"))
    code, err = run(capsys, "--config", config)
    assert code == 2 and "from-env.csv: no such file" in err
    code, err = run(capsys, "--config", config, "--data", tmp_path / "from-flag.csv")
    assert code == 2 and "from-flag.csv: no such file" in err


def test_help_explains_every_flag(capsys):
    assert cli.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--broker", "--fleet", "--id", "--data", "--label-column", "--codec", "--local-epochs",
                 "--batch-size", "--seed", "--status-interval", "--log-level", "--config", "--connect-timeout"):
        assert flag in out
    assert "(default: int8)" in out and "(default: all rows in one call)" in out
