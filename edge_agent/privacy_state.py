"""The agent's privacy ledger on disk: what it has spent and what it has released, across restarts.

A restart must not reset the budget nor draw fresh noise for statistics already released
(issue 19): the file holds the updates made under local DP, the noised statistics
releases and the last noised statistics payload (re-sent as the same bytes), and is
written and fsync'd *before* each release leaves the process. Starting with DP and a
missing or corrupt file is refused unless the operator passes --reset-privacy-state;
a ledger started that way says so in the status (`reset_at`) for as long as it lives.

Format: JSON `{"format": 1, "sha256": hex, "state": {...}}`, the digest over the
canonical JSON of `state`; written to a temporary file, fsync'd, renamed over the old one
and the directory fsync'd. One process at a time: `load_or_reset` takes an exclusive lock
(`<file>.lock`, held while the process lives), since two processes on one ledger would each
spend the budget the file records once.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

FORMAT = 1


class StateError(Exception):
    """The state file is missing, unreadable, corrupt or for another agent or mechanism (one line)."""


class StateMismatch(StateError):
    """The state file is another agent's, or was written under other DP parameters: never reset over it."""


@dataclass
class PrivacyState:
    """Everything a restarted agent needs to continue its privacy account."""

    identity: dict  # agent, fleet and the mechanisms' parameters: a file for another is refused
    updates: int = 0  # noised updates made (local DP contributions)
    stats_releases: int = 0  # noised statistics releases
    stats_rows: int | None = None  # window rows of the last statistics release
    stats_payload: bytes | None = None  # the last noised statistics, re-sent as these bytes
    reset_at: float | None = None  # when this ledger was started afresh by --reset-privacy-state
    created_at: float = field(default_factory=time.time)


def _digest(state: dict) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _to_json(state: PrivacyState) -> dict:
    doc = asdict(state)
    doc["stats_payload"] = None if state.stats_payload is None else base64.b64encode(state.stats_payload).decode()
    return doc


def _count(value: object) -> int:
    """A count as saved: a whole number >= 0 (ValueError otherwise: 2.5, Infinity, true, "3")."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("a count must be a whole number >= 0")
    return value


def _from_json(doc: dict) -> PrivacyState:
    payload = doc.get("stats_payload")
    return PrivacyState(
        identity=dict(doc["identity"]), updates=_count(doc["updates"]), stats_releases=_count(doc["stats_releases"]),
        stats_rows=None if doc.get("stats_rows") is None else _count(doc["stats_rows"]),
        stats_payload=None if payload is None else base64.b64decode(payload, validate=True),
        reset_at=_moment(doc.get("reset_at")), created_at=_moment(doc.get("created_at", 0.0)))


def _moment(value: object) -> float | None:
    """A saved time (it goes into the status): None or a finite number of seconds."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("a time must be a finite number")
    return float(value)


class PrivacyStore:
    """One agent's state file: `load_or_reset` at start, `save` before every release."""

    def __init__(self, path: str, identity: dict) -> None:
        self.path = os.path.abspath(path)
        self.identity = identity
        self.state: PrivacyState | None = None
        self._lock = None  # the open lock file, held for the life of the process

    def load_or_reset(self, reset: bool) -> PrivacyState:
        """The saved state; a fresh one (reset_at now, saved) only when the file is missing or corrupt
        and `reset`; else StateError (one line naming --reset-privacy-state, or the process holding it)."""
        self._take_lock()
        try:
            self.state = self._load()
        except StateError as exc:
            if not reset or isinstance(exc, StateMismatch):
                raise
            self.state = PrivacyState(identity=self.identity, reset_at=time.time())
            self.save()
        return self.state

    def _take_lock(self) -> None:
        """Hold `<file>.lock` exclusively; StateError when another live process holds it."""
        if self._lock is not None:
            return
        lock = open(f"{self.path}.lock", "a+")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise StateError(f"privacy state file {self.path} is in use by another agent process (it holds "
                             f"{self.path}.lock): one process per --state-file, or both would spend its budget") from None
        self._lock = lock

    def _load(self) -> PrivacyState:
        hint = "pass --reset-privacy-state to start a new privacy ledger (its epsilon starts at 0)"
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            raise StateError(f"privacy state file {self.path} does not exist: {hint}") from None
        except OSError as exc:
            raise StateError(f"cannot read privacy state file {self.path}: {exc.strerror}: {hint}") from None
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT or doc.get("sha256") != _digest(doc["state"]):
                raise ValueError("checksum")
            state = _from_json(doc["state"])
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
            raise StateError(f"privacy state file {self.path} is corrupt: {hint}") from None
        if state.identity != self.identity:
            changed = sorted(k for k in set(state.identity) | set(self.identity)
                             if state.identity.get(k) != self.identity.get(k))
            raise StateMismatch(f"privacy state file {self.path} belongs to another agent or mechanism (differs in "
                             f"{', '.join(changed)}): give this agent its own --state-file")
        return state

    def save(self) -> None:
        """Write the state durably (OSError when the disk refuses: the release must then not happen)."""
        body = _to_json(self.state)
        data = json.dumps({"format": FORMAT, "sha256": _digest(body), "state": body}, sort_keys=True).encode()
        directory = os.path.dirname(self.path) or "."
        tmp = f"{self.path}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
