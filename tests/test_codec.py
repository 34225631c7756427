"""Codec round trips, error bounds, unbiasedness and int4 packing."""

import numpy as np
import pytest

from protocol import codec
from protocol.errors import ProtocolError


@pytest.fixture
def x():
    return np.random.default_rng(1).normal(size=1001)  # odd length exercises int4 padding


def test_float32_round_trip_is_exact_to_float32(x):
    enc = codec.encode(x, "float32", np.random.default_rng(0))
    np.testing.assert_allclose(codec.decode(enc), x, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("quant, levels", [("int8", 127), ("int4", 7)])
def test_quantization_error_is_below_one_step(x, quant, levels):
    enc = codec.encode(x, quant, np.random.default_rng(0))
    step = np.abs(x).max() / levels
    assert enc.scale == pytest.approx(step)
    err = np.abs(codec.decode(enc) - x)
    assert err.max() <= step * (1 + 1e-6)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_stochastic_rounding_is_unbiased(quant):
    """The mean of many decodes converges to the input (deterministic rounding would not)."""
    x = np.random.default_rng(2).uniform(-1, 1, size=200)
    x[0] = 1.0  # pin the scale so every encode uses the same grid
    rng = np.random.default_rng(3)
    trials = 4000
    mean = sum(codec.decode(codec.encode(x, quant, rng)).astype(np.float64) for _ in range(trials)) / trials
    step = 1.0 / codec.QUANT_LEVELS[quant]
    # per-coordinate standard error is at most step/2/sqrt(trials); allow 5 sigma
    assert np.abs(mean - x).max() < 5 * (step / 2) / np.sqrt(trials)
    # and a nearest-rounding codec would be off by up to step/2 on average
    nearest = np.round(x / step) * step
    assert np.abs(nearest - x).mean() > 10 * np.abs(mean - x).mean()


def test_int4_packs_two_values_per_byte():
    q = np.array([-7, 7, 0, -1, 3], dtype=np.int8)
    packed = codec.pack_int4(q)
    assert len(packed) == 3
    assert packed[0] == ((-7 + 8) | ((7 + 8) << 4))
    np.testing.assert_array_equal(codec.unpack_int4(packed, 5), q)


@pytest.mark.parametrize("quant", ["float32", "int8", "int4"])
def test_payload_sizes(x, quant):
    enc = codec.encode(x, quant, np.random.default_rng(0))
    assert len(enc.data) == {"float32": 4 * x.size, "int8": x.size, "int4": (x.size + 1) // 2}[quant]


@pytest.mark.parametrize("spec", ["topk:0.05+int8", "topk:0.3+int4", "topk:0.01+float32", "topk:1+int8"])
def test_topk_keeps_largest_coordinates(x, spec):
    enc = codec.encode(x, spec, np.random.default_rng(0))
    out = codec.decode(codec.Encoded.from_wire(enc.to_wire()))
    kept = np.flatnonzero(out)
    parsed = codec.CodecSpec.parse(spec)
    assert enc.k == int(np.ceil(parsed.topk * x.size))
    assert kept.size <= enc.k  # a kept value may quantize to exactly 0
    threshold = np.sort(np.abs(x))[-enc.k]
    assert np.all(np.abs(x[kept]) >= threshold)


def test_topk_index_encoding_picks_the_smaller_form():
    n = 10_000
    single = np.array([1234])
    sparse = np.arange(0, n, 1000)
    dense = np.arange(0, n, 2)
    assert codec.encode_index(single, n)[1] == "u16"
    assert codec.encode_index(sparse, n)[1] == "ef"  # 16 bytes, not 20
    assert codec.encode_index(dense, n)[1] == "bits"
    for idx in (single, sparse, dense):
        data, kind = codec.encode_index(idx, n)
        np.testing.assert_array_equal(codec.decode_index(data, kind, n, idx.size), idx)


def test_topk_index_in_elias_fano_where_it_is_smallest():
    """82 of 820 indices (the 10% top-k of issue 23's model) take 55 bytes in Elias-Fano, not the bitmap's 103;
    every k of small and large n round-trips, and the decoder refuses set padding, a wrong count of high bits,
    repeats, indices past n and a wrong size."""
    rng = np.random.default_rng(5)
    idx = np.sort(rng.choice(820, 82, replace=False))
    data, kind = codec.encode_index(idx, 820)
    assert (kind, len(data)) == ("ef", 55)
    enc = codec.encode(rng.normal(size=820), "topk:0.1+int4", rng)
    assert enc.index_kind == "ef" and codec.decode(codec.Encoded.from_wire(enc.to_wire())).size == 820
    for n, k in [(1, 1), (7, 3), (10, 1), (820, 1), (820, 820), (70_000, 700), (70_000, 3)]:
        idx = np.sort(rng.choice(n, k, replace=False))
        data = codec.encode_ef(idx, n)
        assert len(data) == codec._index_bytes("ef", n, k)
        np.testing.assert_array_equal(codec.decode_index(data, "ef", n, k), idx)
    good = codec.encode_ef(np.array([1, 5, 9]), 12)  # 2 low bits each (6 bits, 1 byte), then 3 + 3 + 1 = 7 high bits
    assert len(good) == 2
    for bad, match in [(bytes([good[0] | 0x80]) + good[1:], "padding"), (good[:1] + bytes([good[1] | 0x80]), "padding"),
                       (good[:1] + bytes([good[1] & 0xFE]), "high bits set"),
                       (codec.encode_ef(np.array([1, 5, 5]), 12), "increasing"),
                       (codec.encode_ef(np.array([1, 5, 13]), 16), "below n")]:
        with pytest.raises(ProtocolError, match=match):
            codec.decode_index(bad, "ef", 12, 3)
    with pytest.raises(ProtocolError) as info:
        codec.Encoded.from_wire(["int8", 12, 1.0, b"\x01" * 3, "ef", 3, good + b"\x00"])
    assert info.value.reason == "shape"


def test_codec_spec_parsing():
    assert str(codec.CodecSpec.parse("topk:0.05+int4")) == "topk:0.05+int4"
    assert codec.CodecSpec.parse("int8") == codec.CodecSpec("int8", None)
    for bad in ("int3", "topk:2+int8", "topk:x+int8", "topk:0.1+int16"):
        with pytest.raises(ValueError):
            codec.CodecSpec.parse(bad)


def test_encode_refuses_non_finite():
    with pytest.raises(ValueError):
        codec.encode(np.array([1.0, np.nan]), "int8", np.random.default_rng(0))


def _wire(**over):
    """A valid dense int8 wire array with fields replaced (top-k fields appended when given)."""
    fields = dict(zip(codec.DELTA_FIELDS, codec.encode(np.ones(10), "int8", np.random.default_rng(0)).to_wire()))
    fields.update(over)
    return [fields[name] for name in codec.DELTA_FIELDS if name in fields]


@pytest.mark.parametrize(
    "wire, reason",
    [
        ("nope", "schema"),
        ({"quant": "int8"}, "schema"),  # a map: format 1
        (_wire()[:3], "schema"),
        (_wire(quant="int16"), "codec"),
        (_wire(n=-1), "shape"),
        (_wire(n=11), "shape"),
        (_wire(data=b"\x00" * 9), "shape"),
        (_wire(data="text"), "schema"),
        (_wire(scale=float("nan")), "non_finite"),
        (_wire(scale=float("inf")), "non_finite"),
        (_wire(scale=1e300), "non_finite"),
        (_wire(scale="1"), "schema"),
        (_wire(n=True), "schema"),
        (_wire(index=b"\x00\x00", index_kind="u64", k=1), "codec"),
        (_wire(index=b"\x00\x00", index_kind="u16", k=1), "shape"),
    ],
)
def test_malformed_wire_raises_typed_error(wire, reason):
    with pytest.raises(ProtocolError) as info:
        codec.Encoded.from_wire(wire)
    assert info.value.reason == reason


def test_decode_refuses_bad_indices_and_overflow():
    bad_order = codec.Encoded("int8", 10, b"\x01\x01", 1.0, np.array([5, 3], "<u2").tobytes(), "u16", 2)
    with pytest.raises(ProtocolError, match="increasing"):
        codec.decode(bad_order)
    out_of_range = codec.Encoded("int8", 10, b"\x01", 1.0, np.array([10], "<u2").tobytes(), "u16", 1)
    with pytest.raises(ProtocolError):
        codec.decode(out_of_range)
    overflow = codec.Encoded("int8", 2, b"\x7f\x7f", 3e38)  # finite scale, infinite values
    with pytest.raises(ProtocolError) as info:
        codec.decode(overflow)
    assert info.value.reason == "non_finite"
    nan32 = codec.Encoded("float32", 1, np.array([np.nan], "<f4").tobytes())
    with pytest.raises(ProtocolError):
        codec.decode(nan32)
