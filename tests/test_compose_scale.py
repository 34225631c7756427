"""docker-compose.scale.yml, the tier in one command: valid for Docker Compose, every port on loopback,
every image from docker/tier.Dockerfile (non-root), the root's and workers' commands accepted by their
own parsers, and the node configs it mounts equal to what tier/cluster.py makes (no Docker engine
needed but for `docker compose config`)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import tier.root
import tier.worker
from tier.cluster import compose_configs

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.scale.yml"
DOCKERFILE = "docker/tier.Dockerfile"


def test_the_mounted_node_configs_are_what_the_cluster_module_makes():
    made = compose_configs()
    assert sorted(made) == ["nats-1.conf", "nats-2.conf", "nats-3.conf"]
    for name, text in made.items():
        on_disk = (ROOT / "deploy" / "tier" / name).read_text()
        assert on_disk == text + "\n", f"deploy/tier/{name} is stale: scripts/tier-cluster --write-compose-configs deploy/tier"
    conf = json.loads(made["nats-1.conf"])
    assert conf["cluster"]["routes"] == ["nats-route://nats-2:6222", "nats-route://nats-3:6222"]
    assert conf["mqtt"]["stream_replicas"] == 3 and conf["jetstream"]["store_dir"] == "/data/js"


@pytest.fixture(scope="module")
def resolved() -> dict:
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI")
    out = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--format", "json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0 and "is not a docker command" in out.stderr:
        pytest.skip("no docker compose plugin")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_compose_accepts_it_and_every_port_is_on_loopback(resolved):
    services = resolved["services"]
    assert {"nats-1", "nats-2", "nats-3", "worker", "root", "root-standby"} <= set(services)
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert len(published) >= 3 and all(p.get("host_ip") == "127.0.0.1" for p in published), published
    assert services["worker"]["deploy"]["replicas"] == 2


def test_every_service_is_the_tier_image_and_mounts_its_node_config(resolved):
    services = resolved["services"]
    for name, service in services.items():
        assert Path(service["build"]["dockerfile"]).as_posix().endswith(DOCKERFILE), name
    for i in (1, 2, 3):
        binds = {m["target"]: m["source"] for m in services[f"nats-{i}"]["volumes"] if m["type"] == "bind"}
        assert binds == {"/etc/fedmq/nats.conf": str(ROOT / "deploy" / "tier" / f"nats-{i}.conf")}
    text = (ROOT / DOCKERFILE).read_text()
    assert "\nUSER fedmq\n" in text and 'FEDMQ_UID}" = 0' in text  # never root


def test_root_and_worker_commands_parse_and_agree_with_the_node_configs(resolved):
    services = resolved["services"]
    partitions = json.loads(compose_configs()["nats-1.conf"])["mappings"]["fedmq.*.update.*"]
    worker = tier.worker.build_parser().parse_args(services["worker"]["command"])
    roots = [tier.root.build_parser().parse_args(services[n]["command"]) for n in ("root", "root-standby")]
    for args in (worker, *roots):
        assert f"partition({args.partitions},2)" in partitions
        assert args.nats.split(",") == [f"nats://nats-{i}:4222" for i in (1, 2, 3)]
        assert args.mqtt.split(",") == [f"mqtt://nats-{i}:1883" for i in (1, 2, 3)]
        assert args.fleet == "demo"
    assert services["worker"]["entrypoint"] == ["python", "-m", "tier.worker"]
    assert all(services[n]["entrypoint"] == ["python", "-m", "tier.root"] for n in ("root", "root-standby"))
