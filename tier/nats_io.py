"""The tier's NATS side from threaded code: one asyncio loop in a thread, one nats-py connection.

The partition workers and the root are paho programs (threads, like the coordinator); JetStream,
KV and leases are nats-py (asyncio). `Nats.call(coro_fn, timeout)` runs a coroutine on the loop
and waits for it, bounded. The connection knows every node: nats-py fails over between them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Awaitable, Callable

import nats
from nats.js import api
from nats.js.errors import BucketNotFoundError, NotFoundError

from protocol.topics import tier_subject
from tier.cluster import TIER_USER, tier_password

log = logging.getLogger(__name__)

LEASE_TTL_S = 2.0  # a dead owner's partitions are free again after this
# a JetStream request (KV read/write, partial publish) unanswered this long is given up and retried by
# its caller: a request sent while a stream elects a new leader (a node died) is never answered, so a
# longer timeout only adds to the 4-9 s election before the retry that succeeds
JS_TIMEOUT_S = 1.0


def bucket_names(fleet: str) -> dict[str, str]:
    """KV buckets and the partial-aggregate stream of one fleet (NATS names: no dots)."""
    safe = fleet.replace(".", "_")
    return {"leases": f"fedmq_{safe}_leases", "state": f"fedmq_{safe}_state", "partials": f"fedmq_{safe}_partials"}


def partial_subject(prefix: str, fleet: str, partition: int, counts: bool = False) -> str:
    """Where a partition's partial aggregates go, or (`counts`) its refusal counts alone: the root's stream holds both."""
    return tier_subject(_fleet(prefix, fleet), "partial_counts" if counts else "partial", int(partition))


def partials_filter(prefix: str, fleet: str) -> str:
    """Every partition's partials and counts: the stream's subjects and the root's consumer."""
    return tier_subject(_fleet(prefix, fleet), "partial", ">")


def _fleet(prefix: str, fleet: str) -> str:
    return f"{prefix}.{fleet.replace('.', '_')}"


class Nats:
    """A nats-py connection on a private event loop thread, with the fleet's buckets and stream."""

    def __init__(self, servers: list[str], fleet: str, *, prefix: str = "fedmq", replicas: int = 1,
                 timeout: float = 10.0, name: str = "fedmq-tier") -> None:
        self.servers = servers
        self.fleet = fleet
        self.prefix = prefix
        self.replicas = replicas
        self.names = bucket_names(fleet)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="nats-loop", daemon=True)
        self.thread.start()
        self.nc = self.call(lambda: nats.connect(
            servers=servers, name=name, connect_timeout=min(timeout, 5), max_reconnect_attempts=-1,
            reconnect_time_wait=0.2, allow_reconnect=True, user=TIER_USER if tier_password() else None,
            password=tier_password(),
            error_cb=self._error, disconnected_cb=self._disconnected, reconnected_cb=self._reconnected,
        ), timeout)
        self.js = self.nc.jetstream(timeout=5)  # set-up calls; the running tier's calls pass JS_TIMEOUT_S
        self.leases = self.call(lambda: self._bucket("leases", ttl=LEASE_TTL_S), timeout)
        self.state = self.call(lambda: self._bucket("state"), timeout)
        self.call(self._stream, timeout)

    def call(self, fn: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
        """Run `fn()` on the loop and return its result; TimeoutError after `timeout` seconds."""
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(fn(), timeout), self.loop)
        return future.result(timeout + 1)

    async def _bucket(self, kind: str, ttl: float | None = None):
        name = self.names[kind]
        try:
            return await self.js.key_value(name)
        except (BucketNotFoundError, NotFoundError):
            return await self.js.create_key_value(bucket=name, ttl=ttl, history=1, replicas=self.replicas,
                                                  max_value_size=8 * 1024 * 1024)

    async def _stream(self) -> None:
        """The partial aggregates: a work queue the root drains; Nats-Msg-Id dedup for 2 minutes."""
        name = self.names["partials"]
        config = api.StreamConfig(
            name=name, subjects=[partials_filter(self.prefix, self.fleet)],
            retention=api.RetentionPolicy.WORK_QUEUE, storage=api.StorageType.FILE,
            num_replicas=self.replicas, duplicate_window=120.0, max_msg_size=8 * 1024 * 1024,
        )
        try:
            await self.js.stream_info(name)
        except NotFoundError:
            await self.js.add_stream(config)

    async def _error(self, exc) -> None:
        log.debug("nats: %s", exc)

    async def _disconnected(self) -> None:
        log.warning("lost the NATS connection; reconnecting to another node")

    async def _reconnected(self) -> None:
        log.info("NATS connection back on %s", self.nc.connected_url.netloc if self.nc.connected_url else "?")

    def close(self) -> None:
        try:
            self.call(self.nc.close, 5)
        except Exception:  # closing after a lost cluster must not raise
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
