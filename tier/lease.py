"""Ownership in NATS KV: a lease per partition (and one for the root), and the fenced checkpoint.

Lease: `create` succeeds only while the key is absent (compare-and-set on revision 0); the owner
renews with `update(last=revision)`; the bucket's TTL (nats_io.LEASE_TTL_S) frees the key of an
owner that stopped renewing. The epoch is the revision of the winning create, which only grows,
so it fences: a partial of an older epoch is an older owner's.

FencedRecord: a checkpoint key written only with `update(last=<the revision this owner read or
wrote>)`. Two processes that both believe they own a partition cannot both write: the second
write fails and its writer stops (it has lost the partition). That, not the lease's timing, is
what makes "a partition never served by two workers at once" hold for the state they commit.
"""

from __future__ import annotations

import logging
import threading
import time

import msgpack
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError

from tier.nats_io import JS_TIMEOUT_S, LEASE_TTL_S, Nats

log = logging.getLogger(__name__)

# checkpoint reads and writes give up after JS_TIMEOUT_S, like the leases: a request sent while the bucket's
# stream has no leader (a node died) is never answered, and with a long timeout every commit in flight at a
# kill waited it out after the election (nats-py's own 5 s for the write, 5 s more for the read that checks
# it: 10 s, seen in the kill test's logs). A write given up on can still land later (the new leader commits
# what the old one had replicated): the record remembers such writes and takes one it finds stored as its own
MAX_UNCONFIRMED = 16


class Fenced(RuntimeError):
    """Another owner wrote this key since we read it: we no longer own what it describes."""


class Lease:
    """A KV lease on `key` for `owner`; `epoch` is the revision it was won at."""

    def __init__(self, nats: Nats, key: str, owner: str, ttl: float = LEASE_TTL_S) -> None:
        self.nats = nats
        self.key = key
        self.owner = owner
        self.ttl = ttl
        self.epoch: int | None = None
        self.revision: int | None = None
        self.confirmed_at = float("-inf")  # monotonic time of the last successful create/renew

    def _value(self) -> bytes:
        return msgpack.packb({"owner": self.owner, "epoch": self.epoch or 0, "t": time.time()})

    def acquire(self) -> bool:
        """Win the lease if nobody holds it; True if we now do."""
        started = time.monotonic()
        try:
            rev = self.nats.call(lambda: self.nats.leases.create(self.key, self._value()), JS_TIMEOUT_S)
        except KeyWrongLastSequenceError:
            return False
        except Exception as exc:  # a node down, no quorum for a moment: not won this time
            log.debug("acquiring %s: %s", self.key, exc)
            return False
        self.epoch = self.revision = rev
        self.confirmed_at = started
        log.info("%s won lease %s at epoch %d", self.owner, self.key, rev)
        return True

    def vacant(self) -> bool:
        """Nobody holds the lease now (False when that cannot be told: a node down)."""
        try:
            self.nats.call(lambda: self.nats.leases.get(self.key), JS_TIMEOUT_S)
            return False
        except (KeyNotFoundError, KeyDeletedError):
            return True
        except Exception:
            return False

    def renew(self) -> bool:
        """Extend the lease; False once it is lost (someone else holds it or it expired)."""
        if self.revision is None:
            return False
        started = time.monotonic()
        try:
            self.revision = self.nats.call(
                lambda: self.nats.leases.update(self.key, self._value(), last=self.revision), JS_TIMEOUT_S)
            self.confirmed_at = started
            return True
        except KeyWrongLastSequenceError:
            # expired, typically while JetStream elected a new leader after a node died: win it back if
            # nobody else did (the fenced checkpoint, not the lease, guards the state in between). The
            # revision is dropped only once that failed: a holder reading None in between gave its
            # partition up for nothing and took it over again through a fresh MQTT session (seen)
            old = self.epoch
            if self.acquire():
                log.info("%s won lease %s back (epoch %s -> %s)", self.owner, self.key, old, self.epoch)
                return True
            self.revision = None
            log.warning("%s lost lease %s (epoch %s)", self.owner, self.key, old)
            return False
        except Exception as exc:  # a node down: try again, fence ourselves if it lasts
            log.debug("renewing %s: %s", self.key, exc)
            return self.valid

    @property
    def valid(self) -> bool:
        """Held, and confirmed recently enough that nobody else can have won it yet."""
        return self.revision is not None and time.monotonic() - self.confirmed_at < self.ttl * 0.8

    def release(self) -> None:
        if self.revision is None:
            return
        try:
            self.nats.call(lambda: self.nats.leases.delete(self.key, last=self.revision), JS_TIMEOUT_S)
        except Exception as exc:  # it expires anyway
            log.debug("releasing %s: %s", self.key, exc)
        self.revision = None


class FencedRecord:
    """A msgpack record in the state bucket, written only over the revision this owner last saw."""

    def __init__(self, nats: Nats, key: str) -> None:
        self.nats = nats
        self.key = key
        self.revision = 0  # 0: the key must not exist yet
        self.unconfirmed: list[bytes] = []  # our writes over `revision` given up on: they may still land

    def read(self, timeout: float = JS_TIMEOUT_S) -> dict | None:
        """The current record (and adopt its revision as the one we write over), or None."""
        try:
            entry = self.nats.call(lambda: self.nats.state.get(self.key), timeout)
        except (KeyNotFoundError, KeyDeletedError) as exc:
            self.revision = getattr(getattr(exc, "entry", None), "revision", None) or 0
            self.unconfirmed.clear()
            return None
        self.revision = entry.revision
        self.unconfirmed.clear()
        return msgpack.unpackb(entry.value, raw=False, strict_map_key=False)

    def write(self, record: dict) -> None:
        """Replace the record; Fenced if another owner wrote since our last read/write, TimeoutError when the
        outcome cannot be told yet (the caller retries)."""
        body = msgpack.packb(record, use_bin_type=True)
        try:
            self.revision = self.nats.call(
                lambda: self.nats.state.update(self.key, body, last=self.revision), JS_TIMEOUT_S)
            self.unconfirmed.clear()
            return
        except KeyWrongLastSequenceError:
            pass  # another owner wrote, or a write of ours given up on landed since
        except Exception:  # unknown outcome (no answer while a node died)
            self.unconfirmed = [*self.unconfirmed[-(MAX_UNCONFIRMED - 1):], body]
        try:  # it is ours only if the stored bytes are ours
            entry = self.nats.call(lambda: self.nats.state.get(self.key), JS_TIMEOUT_S)
        except Exception as exc:
            raise TimeoutError(f"cannot confirm the write of {self.key}: {exc}") from None
        if entry.value == body:
            self.revision = entry.revision
            self.unconfirmed.clear()
        elif entry.value in self.unconfirmed:  # an earlier write of ours landed late: write over it
            self.revision = entry.revision
            self.unconfirmed.clear()
            raise TimeoutError(f"an earlier write of {self.key} landed late; writing again")
        elif entry.revision <= self.revision:  # not landed (yet), or a replica behind the leader answered
            raise TimeoutError(f"the write of {self.key} did not land")
        else:
            raise Fenced(f"{self.key} was written by another owner")


class Vacancy:
    """Acquire only what stayed vacant for `grace` seconds: after a JetStream outage every lease has
    expired at once, and the holders (renewing every ttl/4) should win theirs back before a standby
    or another worker takes them over, or the whole tier would change hands for nothing."""

    def __init__(self, grace: float = 1.0) -> None:
        self.grace = grace
        self.since: dict[str, float] = {}

    def try_acquire(self, lease: Lease) -> bool:
        if not lease.vacant():
            self.since.pop(lease.key, None)
            return False
        first = self.since.setdefault(lease.key, time.monotonic())
        if time.monotonic() - first < self.grace:
            return False
        self.since.pop(lease.key, None)
        return lease.acquire()


class Keeper:
    """Renews a set of leases every ttl/6 on its own thread, so a slow commit never lets one lapse."""

    def __init__(self, ttl: float = LEASE_TTL_S) -> None:
        self.leases: dict[str, Lease] = {}
        self.lock = threading.Lock()
        self.every = ttl / 6
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self.thread.start()

    def add(self, lease: Lease) -> None:
        with self.lock:
            self.leases[lease.key] = lease

    def remove(self, lease: Lease) -> None:
        with self.lock:
            self.leases.pop(lease.key, None)

    def _run(self) -> None:
        while not self.stopping.wait(self.every):
            with self.lock:
                leases = [lease for lease in self.leases.values() if lease.revision is not None]
            for lease in leases:
                lease.renew()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
