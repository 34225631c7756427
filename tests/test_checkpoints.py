"""Checkpoint integrity (issue 10): a checksum, float32-finite parameters, the previous one kept.

Before: one flipped byte in a checkpoint loaded silently, and a flip that made a parameter
1e300 loaded and bricked the fleet (finite in float64, Inf on the float32 wire).
"""

from __future__ import annotations

import hashlib
import logging

import msgpack
import numpy as np
import pytest

from coordinator.store import FILENAME, PREVIOUS, CheckpointError, load_checkpoint, save_checkpoint
from fleet import TopicWatcher, spawn, stop
from protocol.messages import decode_model
from protocol.model_spec import ModelSpec
from protocol.topics import Topics

SPEC = ModelSpec("sgd-classifier", 4, (0, 1, 2))
T = Topics("ckpt")


def state(version: int, **extra) -> dict:
    params = np.linspace(-1, 1, SPEC.n_params) * (version + 1)
    return {"fleet": T.fleet, "spec": SPEC, "version": version, "params": params, "highest_seq": {"a1": version},
            "accepted": version, "rejected": {}, **extra}


def flip(path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def resign(path, **change) -> None:
    """Change fields of the state and recompute its checksum: the fields themselves are at fault."""
    outer = msgpack.unpackb(path.read_bytes())
    body = msgpack.packb({**msgpack.unpackb(outer["state"]), **change}, use_bin_type=True)
    path.write_bytes(msgpack.packb({**outer, "sha256": hashlib.sha256(body).digest(), "state": body}, use_bin_type=True))


def param_offset(path, version: int) -> int:
    """Where the exponent byte of the first float64 parameter of `state(version)` sits in the file."""
    raw = path.read_bytes()
    first = np.float64(state(version)["params"][0]).tobytes()
    return raw.index(first) + 7


def test_every_single_flipped_byte_is_caught(tmp_path):
    save_checkpoint(tmp_path, state(3))
    path = tmp_path / FILENAME
    good = path.read_bytes()
    for offset in range(len(good)):
        path.write_bytes(good)
        flip(path, offset)
        with pytest.raises(CheckpointError, match="is corrupt"):
            load_checkpoint(tmp_path)
    path.write_bytes(good)
    assert load_checkpoint(tmp_path)["version"] == 3


@pytest.mark.parametrize("value", [1e300, 3.5e38, np.inf, np.nan])
def test_parameters_not_finite_in_float32_are_corrupt_even_with_a_valid_checksum(tmp_path, value):
    save_checkpoint(tmp_path, state(1))
    params = state(1)["params"].copy()
    params[0] = value
    resign(tmp_path / FILENAME, params=params.astype("<f8").tobytes())
    with pytest.raises(CheckpointError, match="not finite in float32"):
        load_checkpoint(tmp_path)


def test_spec_and_parameters_must_match(tmp_path):
    save_checkpoint(tmp_path, state(1))
    resign(tmp_path / FILENAME, params=np.zeros(SPEC.n_params + 1).tobytes())
    with pytest.raises(CheckpointError, match="the spec needs"):
        load_checkpoint(tmp_path)
    resign(tmp_path / FILENAME, spec=dict(SPEC.to_wire(), hyperparameters={"loss": "bogus"}))
    with pytest.raises(CheckpointError, match="refused by scikit-learn"):
        load_checkpoint(tmp_path)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_with_one_log_line(tmp_path, caplog):
    save_checkpoint(tmp_path, state(1))
    save_checkpoint(tmp_path, state(2))
    assert load_checkpoint(tmp_path)["version"] == 2
    assert load_checkpoint(tmp_path / "nowhere") is None
    flip(tmp_path / FILENAME, param_offset(tmp_path / FILENAME, 2))
    with caplog.at_level(logging.ERROR, logger="coordinator.store"):
        resumed = load_checkpoint(tmp_path)
    assert resumed["version"] == 1 and resumed["highest_seq"] == {"a1": 1}
    np.testing.assert_array_equal(resumed["params"], state(1)["params"])
    [line] = [r.getMessage() for r in caplog.records]
    assert "checksum mismatch" in line and f"falling back to the previous checkpoint {tmp_path / PREVIOUS} (version 1)" in line


def test_the_good_previous_survives_the_next_save_after_a_fallback(tmp_path):
    """The corrupt newest is overwritten; it never becomes the previous."""
    save_checkpoint(tmp_path, state(1))
    save_checkpoint(tmp_path, state(2))
    flip(tmp_path / FILENAME, 10)
    import coordinator.store as store

    store._verified.clear()  # as a freshly started coordinator
    assert load_checkpoint(tmp_path)["version"] == 1
    save_checkpoint(tmp_path, state(3))
    (tmp_path / FILENAME).unlink()  # lose the newest too: the previous is still the good version 1
    assert load_checkpoint(tmp_path)["version"] == 1
    save_checkpoint(tmp_path, state(4))
    save_checkpoint(tmp_path, state(5))  # now 4 (written by this process) becomes the previous
    flip(tmp_path / FILENAME, 10)
    assert load_checkpoint(tmp_path)["version"] == 4


def test_both_corrupt_is_one_error_line(tmp_path):
    save_checkpoint(tmp_path, state(1))
    save_checkpoint(tmp_path, state(2))
    flip(tmp_path / FILENAME, 10)
    flip(tmp_path / PREVIOUS, 10)
    with pytest.raises(CheckpointError, match="is corrupt .*: move it away to start afresh") as err:
        load_checkpoint(tmp_path)
    assert "\n" not in str(err.value)


def test_unknown_keys_pass_through_and_format_1_still_loads(tmp_path):
    save_checkpoint(tmp_path, state(2, strategy_buffer=[1, 2], audit_offset=77))
    loaded = load_checkpoint(tmp_path)
    assert loaded["strategy_buffer"] == [1, 2] and loaded["audit_offset"] == 77
    legacy = dict(state(5), format=1, spec=SPEC.to_wire(), params=state(5)["params"].astype("<f8").tobytes())
    (tmp_path / FILENAME).write_bytes(msgpack.packb(legacy, use_bin_type=True))
    assert load_checkpoint(tmp_path)["version"] == 5


def test_a_real_coordinator_resumes_from_the_previous_checkpoint_when_the_newest_is_corrupt(mosquitto, tmp_path):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, state(6))
    save_checkpoint(ckpt, state(7))
    flip(ckpt / FILENAME, param_offset(ckpt / FILENAME, 7))  # as a bad disk would: the newest is 1 bit off
    watcher = TopicWatcher(mosquitto.port, T.model)
    coordinator = spawn("coordinator", "--broker", mosquitto.url, "--fleet", T.fleet, "--model", "sgd-classifier",
                        "--n-features", 4, "--classes", "0,1,2", "--publish-interval", "0.2",
                        "--checkpoint-dir", ckpt, "--no-feature-stats",  # no agent here: the resumed model at once
                        log=tmp_path / "coordinator.log")
    try:
        payload = watcher.wait_for(lambda: watcher.latest.get(T.model), 30, "the resumed model")
        model = decode_model(payload, fleet=T.fleet)
        assert model.version == 6
        np.testing.assert_allclose(model.params, state(6)["params"], rtol=1e-6)
    finally:
        watcher.close()
        assert stop(coordinator) == 0
    log = (tmp_path / "coordinator.log").read_text()
    assert "is corrupt (checksum mismatch); falling back to the previous checkpoint" in log, log
    assert "Traceback" not in log
