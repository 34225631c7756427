"""The audit log: one JSON line per payload, saying which (agent, seq) was accepted or why not.

Lines are held in memory until the session commits, then written before the checkpoint
that covers them; the checkpoint records the file's length, and a restart truncates what a
crash left past it. So the log never tells of an update whose effect was lost, and a
redelivered update is logged once more only if its first outcome was never committed.
"""

from __future__ import annotations

import json
import logging
import os
import time

log = logging.getLogger(__name__)


class AuditLog:
    """Append-only JSON lines at `path`; `committed` is the length a checkpoint vouched for."""

    def __init__(self, path: str, committed: int | None = None) -> None:
        self.path = os.path.abspath(path)
        self._lines: list[str] = []
        self._failed = False
        if committed is not None:
            self._truncate(committed)
        self.file = open(self.path, "a", encoding="utf-8")

    def __call__(self, topic, update, reason, staleness, norm=None, limit=None) -> None:
        record = {"t": round(time.time(), 3), "topic": topic, "outcome": reason or "accepted"}
        if update is not None:
            record.update(agent=update.agent_id, seq=update.seq, base=update.base_version, staleness=staleness)
        if norm is not None:  # what the norm bound judged (docs/security.md), and its bound when finite
            record["norm"] = float(f"{norm:.6g}")
            if limit is not None and limit != float("inf"):
                record["norm_limit"] = float(f"{limit:.6g}")
        self._lines.append(json.dumps(record) + "\n")

    def take(self) -> list[str]:
        """The lines since the last call (the session takes them with the state they describe)."""
        lines, self._lines = self._lines, []
        return lines

    def write(self, lines: list[str]) -> int | None:
        """Append and flush `lines`; the file's length after them, None if it cannot be written
        (a full disk must not stop the coordinator: logged once)."""
        try:
            self.file.writelines(lines)
            self.file.flush()
            return self.file.tell()
        except (OSError, ValueError) as exc:
            if not self._failed:
                log.error("cannot write the audit log %s: %s", self.path, exc)
                self._failed = True
            return None

    def close(self) -> None:
        self.write(self.take())
        self.file.close()

    def _truncate(self, committed: int) -> None:
        try:
            size = os.path.getsize(self.path)
            if size > committed:
                os.truncate(self.path, committed)
                log.info("audit log %s: dropped %d bytes written after the last checkpoint", self.path, size - committed)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot truncate the audit log %s to its checkpointed length: %s", self.path, exc)
