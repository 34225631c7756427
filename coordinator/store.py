"""Checkpoints: the global model, its version and the dedup state, written atomically.

A checkpoint file is a msgpack map ``{"format": 2, "sha256": digest, "state": bytes}``: the
state (itself msgpack) and its SHA-256, so one flipped byte is caught. The newest is
`FILENAME`; the one before it is kept as `PREVIOUS`, and `load_checkpoint` falls back to it,
with one ERROR line, when the newest is missing or corrupt. Format 1 files (the state map
itself, no checksum) still load.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import msgpack
import numpy as np

from protocol.model_spec import ModelSpec

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
LEGACY_FORMAT = 1  # no checksum
FILENAME = "checkpoint.msgpack"
PREVIOUS = "checkpoint.previous.msgpack"
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Directories whose newest checkpoint this process wrote or loaded intact: only such a file
# becomes PREVIOUS on the next save (a corrupt newest is overwritten, the good previous kept).
_verified: set[Path] = set()


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message says why in one line."""


def save_checkpoint(directory: str | Path, state: dict) -> Path:
    """Write `state` (fleet, spec, version, params, highest_seq, counters...) atomically.

    Temp file in the same directory, fsync; the current checkpoint, if known intact, is
    hard-linked as `PREVIOUS`; then the temp file is renamed over the current one and the
    directory fsynced: a crash leaves the old or the new checkpoint, never half of one.
    """
    directory = Path(directory)
    record = dict(state, format=CHECKPOINT_FORMAT, spec=state["spec"].to_wire(),
                  params=np.ascontiguousarray(state["params"], dtype="<f8").tobytes())
    body = msgpack.packb(record, use_bin_type=True)
    blob = msgpack.packb({"format": CHECKPOINT_FORMAT, "sha256": hashlib.sha256(body).digest(), "state": body},
                         use_bin_type=True)
    path = directory / FILENAME
    key = directory.resolve()
    keep = directory / (".previous-" + os.urandom(6).hex() + ".tmp")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint in {directory}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        if key in _verified and path.exists():
            os.link(path, keep)
            os.replace(keep, directory / PREVIOUS)
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        keep.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        keep.unlink(missing_ok=True)
        raise
    _verified.add(key)
    return path


def load_checkpoint(directory: str | Path) -> dict | None:
    """The saved state, None when there is none; CheckpointError when it is unusable.

    A newest checkpoint that is missing or corrupt (checksum, fields, parameters not finite
    in float32 or not matching the spec) while `PREVIOUS` is intact: the previous state is
    returned and one ERROR line says so. Keys this module does not know pass through.
    """
    directory = Path(directory)
    path, previous = directory / FILENAME, directory / PREVIOUS
    try:
        state = _load(path)
    except CheckpointError as exc:
        fallback = _fallback(previous)
        if fallback is None:
            raise CheckpointError(f"{exc}: move it away to start afresh") from None
        log.error("%s; falling back to the previous checkpoint %s (version %d)", exc, previous, fallback["version"])
        return fallback
    if state is None:
        fallback = _fallback(previous)
        if fallback is not None:
            log.error("no checkpoint %s; falling back to the previous checkpoint %s (version %d)",
                      path, previous, fallback["version"])
        return fallback
    _verified.add(directory.resolve())
    return state


def _fallback(previous: Path) -> dict | None:
    """The previous checkpoint, or None when it is missing or unusable too (logged)."""
    try:
        return _load(previous)
    except CheckpointError as exc:
        log.error("%s", exc)
        return None


def _load(path: Path) -> dict | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    try:
        record = _unwrap(raw)
        spec = ModelSpec.from_wire(record["spec"])
        params = np.frombuffer(record["params"], dtype="<f8").copy()
        if params.shape != (spec.n_params,):
            raise ValueError(f"{params.size} parameters, the spec needs {spec.n_params}")
        if not np.isfinite(params).all() or np.abs(params).max(initial=0.0) > _FLOAT32_MAX:
            raise ValueError("parameters are not finite in float32 (the wire format)")
        state = dict(
            record,
            fleet=_checked(record.get("fleet"), str, "fleet"),
            spec=spec,
            params=params,
            version=_count(record.get("version"), "version"),
            highest_seq=_counts(record.get("highest_seq", {}), "highest_seq"),
            accepted=_count(record.get("accepted", 0), "accepted"),
            typical_samples=_count(record.get("typical_samples", 0), "typical_samples"),
            rejected=_counts(record.get("rejected", {}), "rejected"),
            clipped=_count(record.get("clipped", 0), "clipped"),
            staleness_sum=_count(record.get("staleness_sum", 0), "staleness_sum"),
            staleness_max=_count(record.get("staleness_max", 0), "staleness_max"),
        )
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt ({exc})") from None
    return state


def _unwrap(raw: bytes) -> dict:
    """The state map of a checkpoint file, its checksum verified (format 2) or none (format 1)."""
    outer = msgpack.unpackb(raw, raw=False)
    if not isinstance(outer, dict):
        raise ValueError("not a map")
    if outer.get("format") == LEGACY_FORMAT:
        return outer
    if outer.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"unknown checkpoint format {outer.get('format')!r}")
    if set(outer) != {"format", "sha256", "state"} or not isinstance(outer["state"], bytes):
        raise ValueError("a format 2 checkpoint holds format, sha256 and state")
    if hashlib.sha256(outer["state"]).digest() != outer["sha256"]:
        raise ValueError("checksum mismatch")
    record = msgpack.unpackb(outer["state"], raw=False)
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("the state is not a format 2 map")
    return record


def _checked(value, kind: type, name: str):
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be {kind.__name__}")
    return value


def _count(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer")
    return value


def _counts(value, name: str) -> dict[str, int]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{name} must map names to integers")
    return {k: _count(v, name) for k, v in value.items()}
