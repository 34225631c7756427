"""Model and update messages: round trips and strict rejection of anything malformed."""

import time

import msgpack
import numpy as np
import pytest

from protocol import codec, messages
from protocol.errors import ProtocolError
from protocol.model_spec import ModelSpec
from protocol.topics import Topics

SPEC = ModelSpec("sgd-classifier", n_features=4, classes=(0, 1, 2))


def _update(**over):
    enc = codec.encode(np.arange(SPEC.n_params, dtype=float), "int8", np.random.default_rng(0))
    fields = dict(agent_id="a1", seq=7, base_version=3, n_samples=20, delta=enc, metrics={"eval_accuracy": 0.5})
    fields.update(over)
    return messages.UpdateMessage(**fields)


def _raw_update(**over):
    """A valid update payload with fields replaced by name."""
    wire = dict(zip(messages.UPDATE_FIELDS, msgpack.unpackb(messages.encode_update(_update()), raw=False)))
    wire.update(over)
    return msgpack.packb(list(wire.values()), use_bin_type=True)


def test_model_round_trip():
    params = np.linspace(-1, 1, SPEC.n_params)
    msg = messages.ModelMessage("f", 12, SPEC, params)
    back = messages.decode_model(messages.encode_model(msg), fleet="f")
    assert back.version == 12 and back.spec == SPEC
    np.testing.assert_allclose(back.params, params, rtol=1e-6)


def test_model_spec_travels_positional_with_classes_as_a_count():
    """The model message's spec is [estimator, n_features, classes, hyperparameters(, columns)], the classes
    0..n-1 as n: 20 classes and no hyperparameters take 24 bytes, not the ~95 of the named map. An older
    coordinator's map is still read; anything else, and a count past max_classes, is refused before any class
    is built."""
    spec = ModelSpec("sgd-classifier", 40, tuple(range(20)), {"alpha": 1e-4})
    wire = msgpack.unpackb(messages.encode_model(messages.ModelMessage("f", 1, spec, np.zeros(spec.n_params))))
    assert wire["spec"] == ["sgd-classifier", 40, 20, {"alpha": 1e-4}]
    assert len(msgpack.packb(wire["spec"])) < 35
    for other in (ModelSpec("sgd-classifier", 2, ("b", "a"), columns=("x", "y")), ModelSpec("sgd-regressor", 3),
                  ModelSpec("sgd-classifier", 2, (1, 2))):
        payload = messages.encode_model(messages.ModelMessage("f", 1, other, np.zeros(other.n_params)))
        assert messages.decode_model(payload).spec == other
    assert msgpack.unpackb(payload)["spec"][2] == [1, 2]  # not 0..n-1: the labels themselves
    old = msgpack.packb({**wire, "spec": spec.to_wire()}, use_bin_type=True)  # an older coordinator's map
    assert messages.decode_model(old).spec == spec
    for bad, reason in [(["sgd-classifier", 40, 20], "schema"), (["sgd-classifier", 40, 20, {}, ["x"] * 40, 1], "schema"),
                        (["sgd-classifier", 40, 10**12, {}], "decode"), (["sgd-classifier", 40, -1, {}], "decode"),
                        (["sgd-classifier", 40, True, {}], "schema"), (["svm", 40, 20, {}], "schema"),
                        (["sgd-classifier", 40, 20, []], "schema"), ("sgd-classifier", "schema")]:
        with pytest.raises(ProtocolError) as info:
            messages.decode_model(msgpack.packb({**wire, "spec": bad}, use_bin_type=True))
        assert info.value.reason == reason, bad
    with pytest.raises(ProtocolError, match="21 classes outside"):
        messages.decode_model(msgpack.packb({**wire, "spec": ["sgd-classifier", 40, 21, {}]}), max_classes=20)


def test_update_round_trip():
    msg = _update()
    back = messages.decode_update(messages.encode_update(msg), "a1")
    assert (back.agent_id, back.seq, back.base_version, back.n_samples) == ("a1", 7, 3, 20)
    assert back.metrics == {"eval_accuracy": 0.5}
    np.testing.assert_allclose(codec.decode(back.delta), codec.decode(msg.delta))


@pytest.mark.parametrize("codec_name, ratio", [("int8", 7), ("topk:0.02+int4", 30)])
def test_whole_update_beats_float64_by_the_target_ratio(codec_name, ratio):
    """The digits model (650 parameters): the whole message, envelope included, is at least
    7x (int8) and 30x (top-k + int4) smaller than the float64 parameters."""
    spec = ModelSpec("sgd-classifier", n_features=64, classes=tuple(range(10)))
    enc = codec.encode(np.random.default_rng(0).normal(size=spec.n_params), codec_name, np.random.default_rng(0))
    metrics = {"eval_loss": 0.123456789, "eval_accuracy": 0.987654321}
    size = len(messages.encode_update(_update(delta=enc, seq=time.time_ns() // 1000, base_version=70_000, metrics=metrics)))
    assert size <= spec.n_params * 8 / ratio


def test_evaluation_metrics_travel_under_short_names():
    """eval_loss, eval_accuracy and eval_r2 are "el", "ea" and "er2" on the wire (18 bytes fewer an update with
    two of them); the decoder gives back the long names, takes an older agent's long names, passes others."""
    metrics = {"eval_loss": 0.25, "eval_accuracy": 0.5, "train_x": 1.0}
    payload = messages.encode_update(_update(metrics=metrics))
    assert msgpack.unpackb(payload)[-1] == {"el": 0.25, "ea": 0.5, "train_x": 1.0}
    assert messages.decode_update(payload, "a1").metrics == metrics
    assert messages.decode_update(_raw_update(metrics={"eval_r2": 0.5, "eval_loss": 1.0}), "a1").metrics == \
        {"eval_r2": 0.5, "eval_loss": 1.0}
    assert messages.decode_update(_raw_update(metrics={"er2": 0.5}), "a1").metrics == {"eval_r2": 0.5}
    longer = msgpack.packb([*msgpack.unpackb(payload)[:-1], {"eval_loss": 0.25, "eval_accuracy": 0.5}], use_bin_type=True,
                           use_single_float=True)
    assert len(longer) - len(messages.encode_update(_update(metrics={"eval_loss": 0.25, "eval_accuracy": 0.5}))) == 18


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "decode"),
        (b"\xc1", "decode"),
        (b"\x92\x01\x02", "schema"),  # an array of 2 fields, not 7
        (msgpack.packb({"format": 2, "type": "update"}), "schema"),  # a map
        (messages.encode_update(_update())[:-5], "decode"),  # truncated
        (_raw_update(format=1), "format"),
        (_raw_update(type="model"), "schema"),
        (_raw_update(seq=-1), "schema"),
        (_raw_update(seq="1"), "schema"),
        (_raw_update(samples=0), "schema"),
        (_raw_update(base=1.5), "schema"),
        (_raw_update(metrics={"loss": float("inf")}), "non_finite"),
        (_raw_update(metrics=[1]), "schema"),
        (_raw_update(delta={"quant": "int8"}), "schema"),
        (b"\x00" * (messages.MAX_MESSAGE_BYTES + 1), "oversize"),
    ],
)
def test_malformed_updates_raise_typed_error(payload, reason):
    with pytest.raises(ProtocolError) as info:
        messages.decode_update(payload, "a1")
    assert info.value.reason == reason
    assert str(info.value)  # a readable message


def test_malformed_model_raises_typed_error():
    good = msgpack.unpackb(messages.encode_model(messages.ModelMessage("f", 1, SPEC, np.zeros(SPEC.n_params))), raw=False)
    for over, reason in [
        ({"params": b"\x00" * 4}, "shape"),
        ({"params": np.full(SPEC.n_params, np.nan, "<f4").tobytes()}, "non_finite"),
        ({"spec": {"estimator": "svm", "n_features": 4}}, "schema"),
        ({"version": -3}, "schema"),
    ]:
        with pytest.raises(ProtocolError) as info:
            messages.decode_model(msgpack.packb({**good, **over}, use_bin_type=True))
        assert info.value.reason == reason


def test_topics():
    t = Topics("plant-1")
    assert t.model == "fedmq/plant-1/model"
    assert t.update("a1") == "fedmq/plant-1/update/a1"
    assert t.agent_status("a1") == "fedmq/plant-1/agent/a1/status"
    assert t.coordinator_status == "fedmq/plant-1/coordinator/status"
    assert t.agent_of_update("fedmq/plant-1/update/a1") == "a1"
    assert t.agent_of_update("fedmq/other/update/a1") is None
    assert t.agent_of_status("fedmq/plant-1/agent/a1/status") == "a1"
    for bad in ("a/b", "+", "#", "", "x" * 65):
        with pytest.raises(ValueError):
            t.update(bad)


def test_the_largest_legitimate_update_fits_the_wire_limits():
    """16 metrics and a top-k delta: every value the update limits allow, and no more."""
    delta = codec.encode(np.linspace(-1, 1, 1000), "topk:0.1+int4", np.random.default_rng(0))
    metrics = {f"eval_m{i}": float(i) for i in range(messages.MAX_METRICS)}
    payload = messages.encode_update(messages.UpdateMessage("a1", 5, 0, 10, delta, metrics))
    assert messages.decode_update(payload, "a1").metrics == metrics


@pytest.mark.parametrize("payload, says", [
    (b"\xdd" + (4 * 1024 * 1024).to_bytes(4, "big"), "array of 4194304 entries"),
    (b"\x97" + b"\x91" * 3 + b"\x90", "nested deeper than 2"),
    (b"\xd4\x01\x00", "type byte 0xd4"),  # ext types: fedmq never sends them
    (b"\xdb" + (300).to_bytes(4, "big") + b"x" * 300, "a str of 300 bytes"),
])
def test_hostile_structures_are_refused_before_they_are_built(payload, says):
    with pytest.raises(ProtocolError, match=says) as err:
        messages.decode_update(payload, "a1")
    assert err.value.reason == "decode" and "\n" not in str(err.value)
