"""Property-based tests: nothing a device can send makes the decoders raise anything but ProtocolError."""

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import codec, messages
from protocol.errors import ProtocolError

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_valid = messages.encode_update(
    messages.UpdateMessage(
        agent_id="a1", seq=1, base_version=0, n_samples=10,
        delta=codec.encode(np.linspace(-1, 1, 50), "topk:0.2+int4", np.random.default_rng(0)),
    )
)
# The valid update with its positional fields named, so a test can replace one by name.
_valid_wire = dict(zip(messages.UPDATE_FIELDS, msgpack.unpackb(_valid, raw=False)))
_valid_wire["delta"] = dict(zip(codec.DELTA_FIELDS, _valid_wire["delta"]))


def _pack(wire: dict) -> bytes:
    """Named fields back to the positional wire arrays (a replaced delta goes as it is)."""
    delta = wire["delta"]
    if isinstance(delta, dict) and set(delta) == set(codec.DELTA_FIELDS):
        delta = [delta[name] for name in codec.DELTA_FIELDS]
    return msgpack.packb([delta if name == "delta" else wire[name] for name in messages.UPDATE_FIELDS], use_bin_type=True)

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20) | st.binary(max_size=64),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


def _decode_fully(payload: bytes) -> None:
    msg = messages.decode_update(payload, "a1")
    out = codec.decode(msg.delta)
    assert out.shape == (msg.delta.n,) and np.isfinite(out).all()


def _must_be_protocol_error_or_valid(payload: bytes) -> None:
    try:
        _decode_fully(payload)
    except ProtocolError as exc:
        assert exc.reason in {"decode", "schema", "shape", "non_finite", "oversize", "codec", "format"}


@SETTINGS
@given(st.binary(max_size=512))
def test_random_bytes(payload):
    _must_be_protocol_error_or_valid(payload)


@SETTINGS
@given(st.integers(min_value=0, max_value=len(_valid) - 1))
def test_truncated_messages(cut):
    _must_be_protocol_error_or_valid(_valid[:cut])


@SETTINGS
@given(st.sampled_from(sorted(_valid_wire)), msgpack_values)
def test_any_field_replaced_by_any_value(key, value):
    wire = dict(_valid_wire, **{key: value})
    _must_be_protocol_error_or_valid(_pack(wire))


@SETTINGS
@given(st.sampled_from(sorted(_valid_wire["delta"])), msgpack_values)
def test_any_delta_field_replaced_by_any_value(key, value):
    wire = dict(_valid_wire, delta=dict(_valid_wire["delta"], **{key: value}))
    _must_be_protocol_error_or_valid(_pack(wire))


@SETTINGS
@given(st.integers(min_value=2**31, max_value=2**62))
def test_huge_declared_sizes_do_not_allocate(n):
    wire = dict(_valid_wire, delta=dict(_valid_wire["delta"], n=n, k=n))
    try:
        _decode_fully(_pack(wire))
    except ProtocolError as exc:
        assert exc.reason == "shape"


@SETTINGS
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e30, max_value=1e30), min_size=1, max_size=200),
       st.sampled_from(["float32", "int8", "int4", "topk:0.1+int8", "topk:0.5+int4"]))
def test_every_finite_vector_round_trips_within_one_step(values, spec):
    x = np.array(values)
    enc = codec.encode(x, spec, np.random.default_rng(0))
    back = codec.decode(codec.Encoded.from_wire(msgpack.unpackb(msgpack.packb(enc.to_wire()), raw=False)))
    assert back.shape == x.shape
    if enc.index is None and enc.quant != "float32":
        assert np.abs(back - x).max() <= enc.scale * 1.0001 + 1e-30
