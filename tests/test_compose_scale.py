"""docker-compose.scale.yml, the tier in one command: valid for Docker Compose, every port on loopback,
one image, built once from docker/tier.Dockerfile (non-root), the root's and workers' commands accepted by their
own parsers, and the node configs it mounts equal to what tier/cluster.py makes (no Docker engine
needed but for `docker compose config`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import tier.auth
import tier.root
import tier.worker
from coordinator.cli import steering_from_args
from protocol.pace import Steering
from tier.cluster import (AUTH_PASSWORD_ENV, AUTH_PASSWORD_REF, ISSUER_ENV, ISSUER_REF, PASSWORD_ENV, PASSWORD_REF,
                          XKEY_ENV, XKEY_REF, compose_configs)

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.scale.yml"
DOCKERFILE = "docker/tier.Dockerfile"
ISSUER = "ABJHLOVMPA4CI6R5KLNGOB4GSLNIY7IOUPAJC4YFNDLQVIOBYQGUWVLA"  # any account public key
XKEY = "XAB3NANV3M6N7AHSQP2U5FRWKKUT7EG2ZXXABV4XVXYQRJGM4S2CZGHT"  # any xkey public key


def test_the_mounted_node_configs_are_what_the_cluster_module_makes():
    made = compose_configs()
    assert sorted(made) == ["nats-1.conf", "nats-2.conf", "nats-3.conf"]
    for name, text in made.items():
        on_disk = (ROOT / "deploy" / "tier" / name).read_text()
        assert on_disk == text + "\n", f"deploy/tier/{name} is stale: scripts/tier-cluster --write-compose-configs deploy/tier"
    conf = _node_config(made["nats-1.conf"])
    # the route password is filled in at the node's start (tier/nats_entry.py, the nodes' entrypoint)
    assert conf["cluster"]["routes"] == [f"nats-route://route:${{{PASSWORD_ENV}}}@nats-{i}:6222" for i in (2, 3)]
    assert conf["cluster"]["authorization"] == {"user": "route", "password": PASSWORD_REF}
    assert conf["mqtt"]["stream_replicas"] == 3 and conf["jetstream"]["store_dir"] == "/data/js"
    # devices through the auth callout, no shared device user (docs/security.md)
    # ... each login sealed to the auth service's xkey (tier/xkey.py)
    assert conf["authorization"]["auth_callout"] == {"issuer": ISSUER_REF, "auth_users": ["tier", "auth"],
                                                     "xkey": XKEY_REF}
    assert "no_auth_user" not in conf["mqtt"] and [u["user"] for u in conf["authorization"]["users"]] == ["tier", "auth"]
    # the logins' passwords (the nodes' requests on $SYS.REQ.USER.AUTH) for the auth user alone, its password its own
    tier_user, auth_user = conf["authorization"]["users"]
    assert tier_user["permissions"] == {"publish": {"deny": ["$SYS.>"]}, "subscribe": {"deny": ["$SYS.>"]}}
    assert auth_user["password"] == AUTH_PASSWORD_REF and "$SYS.REQ.USER.AUTH" in auth_user["permissions"]["subscribe"]["allow"]


def _node_config(text: str) -> dict:
    """A node config as JSON: its unquoted $VARIABLES (nats-server reads them from the environment) quoted."""
    for ref in (PASSWORD_REF, ISSUER_REF, XKEY_REF, AUTH_PASSWORD_REF):
        text = text.replace(ref, json.dumps(ref))
    return json.loads(text)


def _config(env: dict | None = None) -> dict:
    """`docker compose config` of the file (with `env` on top of ours), as JSON."""
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI")
    out = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--format", "json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "FEDMQ_TIER_PASSWORD": "test-only", ISSUER_ENV: ISSUER, XKEY_ENV: XKEY,
                              AUTH_PASSWORD_ENV: "auth-test-only", **(env or {})})
    if out.returncode != 0 and "is not a docker command" in out.stderr:
        pytest.skip("no docker compose plugin")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def resolved() -> dict:
    return _config()


def test_compose_accepts_it_and_every_port_is_on_loopback(resolved):
    services = resolved["services"]
    assert {"nats-1", "nats-2", "nats-3", "worker", "root", "root-standby", "auth"} <= set(services)
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert len(published) >= 3 and all(p.get("host_ip") == "127.0.0.1" for p in published), published
    assert services["worker"]["deploy"]["replicas"] == 2


def test_every_service_is_the_tier_image_and_mounts_its_node_config(resolved):
    services = resolved["services"]
    assert {service["image"] for service in services.values()} == {"fedmq-tier:local"}
    # built once, by one service (compose builds an image once per service that has a build); never pulled
    builders = [name for name, service in services.items() if "build" in service]
    assert builders == ["nats-1"], builders
    assert Path(services["nats-1"]["build"]["dockerfile"]).as_posix().endswith(DOCKERFILE)
    assert all(service["pull_policy"] == "never" for name, service in services.items() if name != "nats-1")
    for i in (1, 2, 3):
        binds = {m["target"]: m["source"] for m in services[f"nats-{i}"]["volumes"] if m["type"] == "bind"}
        assert binds == {"/etc/fedmq/nats.conf": str(ROOT / "deploy" / "tier" / f"nats-{i}.conf")}
    text = (ROOT / DOCKERFILE).read_text()
    assert "\nUSER fedmq\n" in text and 'FEDMQ_UID}" = 0' in text  # never root


def test_root_and_worker_commands_parse_and_agree_with_the_node_configs(resolved):
    services = resolved["services"]
    partitions = _node_config(compose_configs()["nats-1.conf"])["mappings"]["fedmq.*.update.*"]
    worker = tier.worker.build_parser().parse_args(services["worker"]["command"])
    roots = [tier.root.build_parser().parse_args(services[n]["command"]) for n in ("root", "root-standby")]
    for args in (worker, *roots):
        assert f"partition({args.partitions},2)" in partitions
        assert args.nats.split(",") == [f"nats://nats-{i}:4222" for i in (1, 2, 3)]
        assert args.mqtt.split(",") == [f"mqtt://nats-{i}:1883" for i in (1, 2, 3)]
        assert args.fleet == "demo"
    auth = tier.auth.build_parser().parse_args(services["auth"]["command"])
    assert f"partition({auth.partitions},2)" in partitions and auth.topic_prefix == "fedmq"
    assert auth.nats.split(",") == [f"nats://nats-{i}:4222" for i in (1, 2, 3)]
    mounts = {m["target"]: m for m in services["auth"]["volumes"]}
    assert mounts["/auth"]["read_only"] and mounts["/auth"]["source"] == str(ROOT / "deploy" / "tier-auth")
    assert all(str(path).startswith("/auth/") for path in (auth.devices, auth.issuer_seed_file, auth.xkey_seed_file))
    assert services["auth"]["entrypoint"] == ["python", "-m", "tier.auth"] and services["auth"]["deploy"]["replicas"] == 2
    assert all(services[f"nats-{i}"]["environment"][ISSUER_ENV] == ISSUER for i in (1, 2, 3))
    assert all(services[name]["environment"][XKEY_ENV] == XKEY for name in ("nats-1", "nats-2", "nats-3", "auth"))
    # the auth user's password reaches the nodes and the auth service, no root or worker
    holders = {name for name, service in services.items() if AUTH_PASSWORD_ENV in (service.get("environment") or {})}
    assert holders == {"nats-1", "nats-2", "nats-3", "auth"}, holders
    assert services["worker"]["entrypoint"] == ["python", "-m", "tier.worker"]
    assert all(services[f"nats-{i}"]["entrypoint"] == ["python", "-m", "tier.nats_entry"] for i in (1, 2, 3))
    assert all(services[n]["entrypoint"] == ["python", "-m", "tier.root"] for n in ("root", "root-standby"))


def test_the_roots_pace_steering_is_set_by_env_and_off_by_default(resolved):
    """FEDMQ_TIER_TARGET_UPDATES_PER_S and FEDMQ_TIER_PACE_* reach both roots' --target-updates-per-s and --pace-*;
    unset, the roots are not steered and the bounds are tier.root's own defaults (seen red without the flags)."""
    defaults = tier.root.build_parser().parse_args(["--nats", "n", "--mqtt", "m", "--fleet", "f", "--model",
                                                     "sgd-classifier", "--n-features", "1"])
    for name in ("root", "root-standby"):
        args = tier.root.build_parser().parse_args(resolved["services"][name]["command"])
        assert steering_from_args(args) is None
        assert (args.pace_min_interval, args.pace_max_interval, args.pace_jitter) == \
            (defaults.pace_min_interval, defaults.pace_max_interval, defaults.pace_jitter)
    env = {"FEDMQ_TIER_TARGET_UPDATES_PER_S": "50", "FEDMQ_TIER_PACE_MIN_INTERVAL": "2",
           "FEDMQ_TIER_PACE_MAX_INTERVAL": "300", "FEDMQ_TIER_PACE_JITTER": "0.2"}
    services = _config(env)["services"]
    for name in ("root", "root-standby"):
        steering = steering_from_args(tier.root.build_parser().parse_args(services[name]["command"]))
        assert steering == Steering(50.0, 2.0, 300.0, 0.2), steering


def test_the_tier_image_shares_the_coordinator_images_layers():
    """docker/tier.Dockerfile is docker/coordinator.Dockerfile line for line from FROM to the coordinator's install
    (so the classic builder's cache serves one from the other), then installs pyproject.toml's [tier] extra."""
    import tomllib

    tier_lines = (ROOT / DOCKERFILE).read_text().splitlines()
    coordinator = (ROOT / "docker" / "coordinator.Dockerfile").read_text().splitlines()
    first, last = coordinator.index("FROM python:3.11-slim"), coordinator.index(" && rm -rf /src")
    start = tier_lines.index("FROM python:3.11-slim")
    assert tier_lines[start:start + last - first + 1] == coordinator[first:last + 1]
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["tier"]
    install = "RUN pip install --no-cache-dir " + " ".join(f'"{r}"' for r in extra)
    assert tier_lines[start + last - first + 2:].count(install) == 1, f"no {install!r} after the shared part"


def test_the_metrics_port_and_packet_limit_are_set_by_env_and_off_by_default(resolved):
    """FEDMQ_TIER_METRICS_PORT reaches both roots' and the workers' --metrics-port, FEDMQ_TIER_MAX_PACKET_BYTES both
    roots' --max-packet-bytes; unset (0), no exporter and no limit, as tier.root's and tier.worker's own defaults.
    Seen red on the file without them (the attributes stayed None with the variables set)."""
    parse = {"root": tier.root.build_parser, "root-standby": tier.root.build_parser, "worker": tier.worker.build_parser}
    for name, build in parse.items():
        args = build().parse_args(resolved["services"][name]["command"])
        assert args.metrics_port is None and getattr(args, "max_packet_bytes", None) is None, name
    services = _config({"FEDMQ_TIER_METRICS_PORT": "9464", "FEDMQ_TIER_MAX_PACKET_BYTES": "131072"})["services"]
    for name, build in parse.items():
        args = build().parse_args(services[name]["command"])
        assert args.metrics_port == 9464, name
        if name != "worker":  # a worker publishes no model
            assert args.max_packet_bytes == 131072, name


def test_the_roots_eval_csv_is_set_by_env_and_off_by_default(resolved, tmp_path):
    """FEDMQ_TIER_EVAL_CSV reaches both roots' --eval-csv and FEDMQ_TIER_EVAL_DIR is mounted read-only at /eval in
    both; unset, neither root scores (an empty --eval-csv) and the default mount is a directory of the checkout
    (seen red with the flag left out of the standby's volumes or the command)."""
    def roots(services) -> list[tuple[str, dict]]:
        out = []
        for name in ("root", "root-standby"):
            binds = {m["target"]: m for m in services[name]["volumes"] if m["type"] == "bind"}
            out.append((tier.root.build_parser().parse_args(services[name]["command"]).eval_csv, binds["/eval"]))
        return out

    for eval_csv, mount in roots(resolved["services"]):
        assert eval_csv == "" and mount["read_only"] and Path(mount["source"]).is_dir(), (eval_csv, mount)
    services = _config({"FEDMQ_TIER_EVAL_DIR": str(tmp_path), "FEDMQ_TIER_EVAL_CSV": "/eval/eval.csv"})["services"]
    for eval_csv, mount in roots(services):
        assert eval_csv == "/eval/eval.csv" and mount["source"] == str(tmp_path) and mount["read_only"], (eval_csv, mount)
