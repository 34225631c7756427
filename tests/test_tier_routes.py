"""The cluster port is authenticated (tier/cluster.py `route_url`): a nats-server that dials a node's cluster
port without the route password is refused, so it cannot join as a server and read or write every subject past
the users' rights. Three real nodes whose password needs URL quoting (it rides inside the route URL) form
their cluster; a rogue server with the right credentials joins (the probe can see a join), one without them is
refused (the node logs the violation; the rogue never lists a route). The compose configs' placeholder is
filled by tier/nats_entry.py into a config nats-server accepts (the same password, with a space, made
nats-server refuse the config when left to its own `$NAME` substitution). Seen red with the cluster's `authorization`
removed (the rogue without credentials joined)."""

from __future__ import annotations

import json
import subprocess
import urllib.request

from tier.cluster import (ISSUER_ENV, PASSWORD_ENV, XKEY_ENV, NatsCluster, compose_configs, free_ports,
                          nats_server_binary, route_url)
from tier.fleet import wait_until
from tier.nats_entry import fill
from tier.nkey import KeyPair
from tier.xkey import XKey

PASSWORD = "p/w:x@y%z 1"  # every character a URL would misread


def _routes(http_port: int) -> set[str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/routez", timeout=2) as r:
            return {route.get("remote_name", "") for route in json.load(r).get("routes", [])}
    except OSError:
        return set()


def _rogue(tmp_path, name: str, route: str) -> tuple[subprocess.Popen, int]:
    client, http, cluster = free_ports(3)
    conf = tmp_path / f"{name}.conf"
    conf.write_text(json.dumps({"server_name": name, "listen": f"127.0.0.1:{client}", "http": f"127.0.0.1:{http}",
                                "cluster": {"name": "fedmq", "listen": f"127.0.0.1:{cluster}", "routes": [route]}}))
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf), "-l", str(tmp_path / f"{name}.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, http


def test_a_server_without_the_route_password_cannot_join_the_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    with NatsCluster(tmp_path / "nats", nodes_count=3, partitions=4) as cluster:
        n1 = cluster.nodes[0]
        peers = {n.name for n in cluster.nodes[1:]}
        assert wait_until(lambda: peers <= _routes(n1.http_port), 30), "the three nodes never routed to each other"
        seed = f"127.0.0.1:{n1.cluster_port}"
        good, good_http = _rogue(tmp_path, "with-password", route_url(PASSWORD, seed))
        bad, bad_http = _rogue(tmp_path, "without-password", f"nats-route://{seed}")
        try:
            assert wait_until(lambda: "n1" in _routes(good_http), 30), "a server with the password never joined"
            log = n1.log
            assert wait_until(lambda: "without-password" in _routes(n1.http_port)
                              or "Router connection closed: Authentication Failure" in log.read_text(errors="replace"), 30), log.read_text()
            assert "without-password" not in _routes(n1.http_port)
            assert not _routes(bad_http), "the server without the password holds a route"
        finally:
            for proc in (good, bad):
                proc.kill()
                proc.wait(10)


def test_the_compose_configs_route_placeholder_is_filled_into_a_config_nats_server_accepts(tmp_path):
    config = compose_configs(partitions=4)["nats-1.conf"]
    assert "${%s}@nats-2:6222" % PASSWORD_ENV in config
    filled = tmp_path / "nats.conf"
    filled.write_text(fill(config, PASSWORD, "auth # pw"))
    assert "route:p%2Fw%3Ax%40y%25z%201@nats-2:6222" in filled.read_text()
    assert '"password": "p/w:x@y%z 1"' in filled.read_text()  # quoted: as given (nats-server would parse $NAME's text)
    assert '"password": "auth # pw"' in filled.read_text()  # the auth user's, likewise
    # the auth callout's issuer and xkey stay whole-value $FEDMQ_TIER_AUTH_ISSUER, _XKEY (nkeys: nothing to misparse)
    check = subprocess.run([nats_server_binary(), "-c", str(filled), "-t"], capture_output=True, text=True,
                           env={ISSUER_ENV: KeyPair.create().public, XKEY_ENV: XKey.create().public}, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_compose_node_without_the_auth_users_password_does_not_start(tmp_path, monkeypatch, capsys):
    """The nodes' config names the auth user's password too: unset, the entry point says so in one line, exit 2."""
    from tier.cluster import AUTH_PASSWORD_ENV
    from tier.nats_entry import main

    config = tmp_path / "nats.conf"
    config.write_text(compose_configs(partitions=4)["nats-1.conf"])
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    monkeypatch.delenv(AUTH_PASSWORD_ENV, raising=False)
    assert main([str(config), str(tmp_path / "out.conf")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"tier nats node: {AUTH_PASSWORD_ENV} is not set (the auth user's password: the device authorization service's)"]
    assert not (tmp_path / "out.conf").exists()
