"""Checkpoints: the global model, its version and the dedup state, written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import msgpack
import numpy as np

from protocol.model_spec import ModelSpec

CHECKPOINT_FORMAT = 1
FILENAME = "checkpoint.msgpack"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message says why in one line."""


def save_checkpoint(directory: str | Path, state: dict) -> Path:
    """Write `state` (fleet, spec, version, params, highest_seq, counters) atomically.

    Temp file in the same directory, fsync, rename over the old one, fsync the directory:
    a crash leaves either the old or the new checkpoint, never half of one.
    """
    directory = Path(directory)
    record = dict(state, format=CHECKPOINT_FORMAT, spec=state["spec"].to_wire(),
                  params=np.ascontiguousarray(state["params"], dtype="<f8").tobytes())
    blob = msgpack.packb(record, use_bin_type=True)
    path = directory / FILENAME
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
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(directory: str | Path) -> dict | None:
    """The saved state, None when there is none; CheckpointError when it is unusable."""
    path = Path(directory) / FILENAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    try:
        record = msgpack.unpackb(raw, raw=False)
        if not isinstance(record, dict):
            raise ValueError("not a map")
        if record.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unknown checkpoint format {record.get('format')!r}")
        spec = ModelSpec.from_wire(record["spec"])
        params = np.frombuffer(record["params"], dtype="<f8").copy()
        if params.shape != (spec.n_params,) or not np.isfinite(params).all():
            raise ValueError("parameters do not match the spec or are not finite")
        state = dict(
            record,
            fleet=_checked(record.get("fleet"), str, "fleet"),
            spec=spec,
            params=params,
            version=_count(record.get("version"), "version"),
            highest_seq=_counts(record.get("highest_seq", {}), "highest_seq"),
            accepted=_count(record.get("accepted", 0), "accepted"),
            rejected=_counts(record.get("rejected", {}), "rejected"),
            clipped=_count(record.get("clipped", 0), "clipped"),
            staleness_sum=_count(record.get("staleness_sum", 0), "staleness_sum"),
            staleness_max=_count(record.get("staleness_max", 0), "staleness_max"),
        )
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt ({exc}): move it away to start afresh") from None
    return state


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
