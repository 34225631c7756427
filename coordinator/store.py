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
    """A checkpoint that exists but cannot be used; the message says why."""


def save_checkpoint(directory: str | Path, state: dict) -> Path:
    """Write `state` (fleet, spec, version, params, highest_seq, counters) atomically.

    Temp file in the same directory, fsync, rename over the old one, fsync the directory:
    a crash leaves either the old or the new checkpoint, never half of one.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = dict(state, format=CHECKPOINT_FORMAT, spec=state["spec"].to_wire(),
                  params=np.ascontiguousarray(state["params"], dtype="<f8").tobytes())
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(msgpack.packb(record, use_bin_type=True))
            fh.flush()
            os.fsync(fh.fileno())
        path = directory / FILENAME
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
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
        if record.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unknown checkpoint format {record.get('format')!r}")
        spec = ModelSpec.from_wire(record["spec"])
        params = np.frombuffer(record["params"], dtype="<f8").copy()
        if params.shape != (spec.n_params,) or not np.isfinite(params).all():
            raise ValueError("parameters do not match the spec or are not finite")
        version = int(record["version"])
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from None
    return dict(record, spec=spec, params=params, version=version)
