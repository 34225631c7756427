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


# --- bounded decoding (issue 10): the structural scan against msgpack's own encoder ----------

def _stats(value, depth: int = 0) -> dict:
    """What `messages.scan` bounds, computed from the Python value msgpack packs."""
    out = {"objects": 1, "depth": 0, "array": 0, "map": 0, "str": 0, "bin": 0}
    children = []
    if isinstance(value, list):
        out["array"], out["depth"], children = len(value), 1, value
    elif isinstance(value, dict):
        out["map"], out["depth"] = len(value), 1
        children = [x for kv in value.items() for x in kv]
    elif isinstance(value, str):
        out["str"] = len(value.encode())
    elif isinstance(value, bytes):
        out["bin"] = len(value)
    for child in children:
        sub = _stats(child)
        out["objects"] += sub["objects"]
        out["depth"] = max(out["depth"], 1 + sub["depth"])
        for key in ("array", "map", "str", "bin"):
            out[key] = max(out[key], sub[key])
    return out


def _limits(stats: dict, **tighter) -> messages.WireLimits:
    fields = {"max_objects": stats["objects"], "max_depth": stats["depth"], "max_array": stats["array"],
              "max_map": stats["map"], "max_str": stats["str"], "max_bin": stats["bin"]}
    fields.update(tighter)
    return messages.WireLimits(**fields)


@SETTINGS
@given(msgpack_values)
def test_scan_accepts_exactly_what_its_limits_allow(value):
    payload = msgpack.packb(value, use_bin_type=True)
    stats = _stats(value)
    messages.scan(payload, _limits(stats))  # at its own figures: accepted
    for name, key in (("max_objects", "objects"), ("max_depth", "depth"), ("max_array", "array"),
                      ("max_map", "map"), ("max_str", "str"), ("max_bin", "bin")):
        figure = stats[key]
        if figure == 0:
            continue
        try:
            messages.scan(payload, _limits(stats, **{name: figure - 1}))
        except ProtocolError as exc:
            assert exc.reason == "decode"
        else:
            raise AssertionError(f"{name}={figure - 1} accepted a payload needing {figure}")


@SETTINGS
@given(msgpack_values, st.integers(min_value=0, max_value=200))
def test_scan_refuses_truncation_and_trailing_bytes(value, cut):
    payload = msgpack.packb(value, use_bin_type=True)
    generous = messages.WireLimits(max_objects=10**6, max_depth=64, max_array=10**6, max_map=10**6)
    for bad in ([payload[:cut]] if cut < len(payload) else []) + [payload + b"\x00"]:
        try:
            messages.scan(bad, generous)
        except ProtocolError as exc:
            assert exc.reason == "decode"
        else:
            raise AssertionError("a truncated or padded document was accepted")


@SETTINGS
@given(st.integers(min_value=8, max_value=4 * 1024 * 1024), st.sampled_from([b"\x90", b"\x80", b"\xc0", b"\x9f"]))
def test_containers_of_any_size_are_refused_within_the_update_limits(n, filler):
    """Up to the coordinator's 4 MiB: an array or map too long, or too many values, never a build."""
    for header in (b"\xdd" + n.to_bytes(4, "big"), b"\xdf" + n.to_bytes(4, "big")):
        payload = header + filler * 64  # the rest is never read: refused at the header or within 48 values
        try:
            messages.decode_update(payload, "a1")
        except ProtocolError as exc:
            assert exc.reason == "decode"
        else:
            raise AssertionError("accepted")


@SETTINGS
@given(st.integers(min_value=2, max_value=300), st.integers(min_value=2, max_value=300))
def test_model_class_count_is_bounded_by_max_classes(n_classes, max_classes):
    from protocol.model_spec import ModelSpec

    spec = ModelSpec("sgd-classifier", 2, tuple(range(n_classes)))
    payload = messages.encode_model(messages.ModelMessage("f", 1, spec, np.zeros(spec.n_params)))
    try:
        got = messages.decode_model(payload, max_classes=max_classes)
    except ProtocolError as exc:
        assert n_classes > max_classes and exc.reason == "decode"
    else:
        assert n_classes <= max_classes and got.spec == spec
