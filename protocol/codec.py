"""Update codecs: float32, int8/int4 stochastic quantization, top-k sparsification.

A codec is named by a spec string: ``float32``, ``int8``, ``int4``, or
``topk:FRACTION+QUANT`` (for example ``topk:0.05+int4``): keep the largest FRACTION of
coordinates by magnitude and quantize their values with QUANT. Encoding is pure: the
caller passes the random generator; error feedback for the lossy part lives on the agent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from protocol.errors import ProtocolError

QUANT_LEVELS = {"int8": 127, "int4": 7}
QUANTIZERS = ("float32", "int8", "int4")
# Index encodings for top-k: explicit little-endian integers, a bitmap over all n, or Elias-Fano ("ef": each
# index's low bits as they are, its high bits in unary; ~2 + log2(n/k) bits an index: 55 bytes for 82 of 820,
# where the bitmap is 103). A coordinator before "ef" refuses such updates (reason codec): upgrade it first.
_INDEX_KINDS = ("u16", "u32", "bits", "ef")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Positions in the wire array: dense deltas send the first four, top-k all seven.
DELTA_FIELDS = ("quant", "n", "scale", "data", "index_kind", "k", "index")


@dataclass(frozen=True)
class CodecSpec:
    """A parsed codec name: the value quantizer and an optional top-k fraction."""

    quant: str = "int8"
    topk: float | None = None

    @classmethod
    def parse(cls, text: str) -> "CodecSpec":
        text = text.strip()
        topk = None
        if text.startswith("topk:"):
            frac, _, quant = text[5:].partition("+")
            try:
                topk = float(frac)
            except ValueError:
                raise ValueError(f"codec {text!r}: top-k fraction {frac!r} is not a number") from None
            if not 0.0 < topk <= 1.0:
                raise ValueError(f"codec {text!r}: top-k fraction must be in (0, 1]")
            text = quant or "float32"
        if text not in QUANTIZERS:
            raise ValueError(
                f"unknown codec {text!r}: use float32, int8, int4 or topk:FRACTION+QUANT"
            )
        return cls(quant=text, topk=topk)

    def __str__(self) -> str:
        return self.quant if self.topk is None else f"topk:{self.topk:g}+{self.quant}"


@dataclass(frozen=True)
class Encoded:
    """An encoded vector as it travels: what `decode` needs and nothing else."""

    quant: str
    n: int  # length of the full (dense) vector
    data: bytes  # quantized values (k of them when sparse)
    scale: float = 1.0
    index: bytes | None = None  # top-k only
    index_kind: str | None = None
    k: int | None = None

    def to_wire(self) -> list:
        """The positional array of DELTA_FIELDS that travels in an update."""
        wire = [self.quant, self.n, self.scale, self.data]
        if self.index is not None:
            wire += [self.index_kind, self.k, self.index]
        return wire

    @classmethod
    def from_wire(cls, wire: object, *, max_n: int = 50_000_000) -> "Encoded":
        """Check the types and sizes of a wire array and build an `Encoded` (no decoding yet)."""
        if not isinstance(wire, list) or len(wire) not in (4, len(DELTA_FIELDS)):
            raise ProtocolError("schema", f"delta must be an array of 4 (dense) or {len(DELTA_FIELDS)} (top-k) fields")
        wire = dict(zip(DELTA_FIELDS, wire))
        quant = wire.get("quant")
        if quant not in QUANTIZERS:
            raise ProtocolError("codec", f"unknown quantizer {quant!r}")
        n = _int_field(wire, "n", 1, max_n)
        scale = wire.get("scale")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise ProtocolError("schema", "delta.scale must be a number")
        if not math.isfinite(scale) or not 0 <= scale <= _FLOAT32_MAX:
            raise ProtocolError("non_finite", f"delta.scale {scale!r} is not a finite non-negative float32")
        data = wire.get("data")
        if not isinstance(data, bytes):
            raise ProtocolError("schema", "delta.data must be bytes")
        index = wire.get("index")
        if "index" not in wire:  # dense; a top-k array with a nil index was read as dense, its kind and k unread
            k = None
            kind = None
        else:
            if not isinstance(index, bytes):
                raise ProtocolError("schema", "delta.index must be bytes")
            kind = wire.get("index_kind")
            if kind not in _INDEX_KINDS:
                raise ProtocolError("codec", f"unknown index kind {kind!r}")
            k = _int_field(wire, "k", 0, n)
        count = n if k is None else k
        if len(data) != _data_bytes(quant, count):
            raise ProtocolError(
                "shape", f"delta.data has {len(data)} bytes, {quant} x {count} needs {_data_bytes(quant, count)}"
            )
        if index is not None and len(index) != _index_bytes(kind, n, count):
            raise ProtocolError(
                "shape", f"delta.index has {len(index)} bytes, {kind} for k={count} of n={n} needs {_index_bytes(kind, n, count)}"
            )
        return cls(quant=quant, n=n, data=data, scale=float(scale), index=index, index_kind=kind, k=k)


def _int_field(wire: dict, key: str, low: int, high: int) -> int:
    value = wire.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError("schema", f"delta.{key} must be an integer")
    if not low <= value <= high:
        raise ProtocolError("shape", f"delta.{key}={value} outside [{low}, {high}]")
    return value


def _data_bytes(quant: str, count: int) -> int:
    return {"float32": 4 * count, "int8": count, "int4": (count + 1) // 2}[quant]


def _index_bytes(kind: str, n: int, k: int) -> int:
    if kind == "ef":
        low, high = _ef_sizes(n, k)
        return (low + 7) // 8 + (high + 7) // 8
    return {"u16": 2 * k, "u32": 4 * k, "bits": (n + 7) // 8}[kind]


def _ef_low_bits(n: int, k: int) -> int:
    """Elias-Fano's low bits per index: floor(log2(n / k)), integers only (0 when k is 0 or n < 2k)."""
    return (n // k).bit_length() - 1 if k else 0


def _ef_sizes(n: int, k: int) -> tuple[int, int]:
    """Bits of the low part (k x low bits) and of the unary high part (k ones, one zero per high value)."""
    low = _ef_low_bits(n, k)
    return k * low, k + ((n - 1) >> low) + 1 if n else k


# --- quantization -------------------------------------------------------------------


def stochastic_round(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Round each element down or up at random so that E[result] == x (unbiased)."""
    return np.floor(x + rng.random(x.shape, dtype=np.float32 if x.dtype == np.float32 else np.float64))


def quantize(values: np.ndarray, quant: str, rng: np.random.Generator) -> tuple[bytes, float]:
    """Encode `values` with one quantizer; returns (bytes, scale)."""
    if quant == "float32":
        return np.ascontiguousarray(values, dtype="<f4").tobytes(), 1.0
    levels = QUANT_LEVELS[quant]
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    # float32, exactly what the wire keeps; a peak so small that it rounds to 0 quantizes to 0
    scale = float(np.float32(peak / levels)) or 1.0
    q = np.clip(stochastic_round(values / scale, rng), -levels, levels).astype(np.int8)
    if quant == "int8":
        return q.tobytes(), scale
    return pack_int4(q), scale


def dequantize(data: bytes, quant: str, count: int, scale: float) -> np.ndarray:
    """Inverse of `quantize`; returns float32 values (sizes were checked by `Encoded.from_wire`)."""
    if quant == "float32":
        return np.frombuffer(data, dtype="<f4", count=count).astype(np.float32)
    if quant == "int8":
        q = np.frombuffer(data, dtype=np.int8, count=count)
    else:
        q = unpack_int4(data, count)
    with np.errstate(over="ignore"):  # overflow becomes Inf, which decode() refuses
        return q.astype(np.float32) * np.float32(scale)


def pack_int4(q: np.ndarray) -> bytes:
    """Pack values in [-8, 7] two per byte: element 2i in the low nibble, 2i+1 in the high."""
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    if u.size % 2:
        u = np.append(u, np.uint8(8))  # pad with a zero
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(data: bytes, count: int) -> np.ndarray:
    """Inverse of `pack_int4`: `count` int8 values."""
    b = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(b.size * 2, dtype=np.int8)
    out[0::2] = (b & 0x0F).astype(np.int8) - 8
    out[1::2] = (b >> 4).astype(np.int8) - 8
    return out[:count]


# --- top-k ----------------------------------------------------------------------------


def top_k_indices(x: np.ndarray, fraction: float) -> np.ndarray:
    """Sorted indices of the ceil(fraction * n) largest-magnitude entries of x."""
    k = max(1, min(x.size, math.ceil(fraction * x.size)))
    if k == x.size:
        return np.arange(x.size)
    return np.sort(np.argpartition(np.abs(x), x.size - k)[x.size - k:])


def encode_index(idx: np.ndarray, n: int) -> tuple[bytes, str]:
    """Smallest encoding of sorted indices: u16/u32 list, a bitmap over n or Elias-Fano."""
    kind = min(("u16" if n <= 1 << 16 else "u32", "bits", "ef"), key=lambda kind: _index_bytes(kind, n, idx.size))
    if kind == "ef":
        return encode_ef(idx, n), kind
    if kind == "bits":
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
        return np.packbits(mask, bitorder="little").tobytes(), "bits"
    dtype = "<u2" if kind == "u16" else "<u4"
    return idx.astype(dtype).tobytes(), kind


def encode_ef(idx: np.ndarray, n: int) -> bytes:
    """Elias-Fano of sorted distinct indices below n: the low bits of each (little-endian bit order), then a bitmap
    with a one at high_i + i for the i-th index (high_i = idx_i >> low bits); each part padded to a byte."""
    idx = np.asarray(idx, dtype=np.int64)
    k, low = idx.size, _ef_low_bits(n, idx.size)
    low_size, high_size = _ef_sizes(n, k)
    bits = ((idx[:, None] >> np.arange(low)) & 1).astype(np.uint8).ravel()
    high = np.zeros(high_size, dtype=np.uint8)
    high[(idx >> low) + np.arange(k)] = 1
    return np.packbits(bits, bitorder="little").tobytes() + np.packbits(high, bitorder="little").tobytes()


def decode_ef(index: bytes, n: int, k: int) -> np.ndarray:
    """Inverse of `encode_ef` (its size checked by `Encoded.from_wire`); refuses set padding bits and a high part
    without exactly k ones. The caller checks the indices increase and stay below n."""
    low, (low_size, high_size) = _ef_low_bits(n, k), _ef_sizes(n, k)
    split = (low_size + 7) // 8
    bits = np.unpackbits(np.frombuffer(index[:split], dtype=np.uint8), bitorder="little")
    high = np.unpackbits(np.frombuffer(index[split:], dtype=np.uint8), bitorder="little")
    if bits[low_size:].any() or high[high_size:].any():
        raise ProtocolError("shape", "Elias-Fano index has padding bits set")
    ones = np.flatnonzero(high)
    if ones.size != k:
        raise ProtocolError("shape", f"Elias-Fano index has {ones.size} high bits set, k={k}")
    lows = np.zeros((k, 8), dtype=np.uint8)  # each index's low bits as a little-endian int64, no wider array built
    if low:
        packed = np.packbits(bits[:low_size].reshape(k, low), axis=1, bitorder="little")
        lows[:, :packed.shape[1]] = packed
    return ((ones - np.arange(k)) << low) | lows.view("<i8").ravel()


def decode_index(index: bytes, kind: str, n: int, k: int) -> np.ndarray:
    """Inverse of `encode_index`; refuses out-of-range, unsorted or repeated indices."""
    if kind == "bits":
        mask = np.unpackbits(np.frombuffer(index, dtype=np.uint8), bitorder="little")
        if mask[n:].any():
            raise ProtocolError("shape", "index bitmap has bits past n")
        idx = np.flatnonzero(mask[:n])
        if idx.size != k:
            raise ProtocolError("shape", f"index bitmap has {idx.size} bits set, k={k}")
        return idx
    if kind == "ef":
        idx = decode_ef(index, n, k)
    else:
        idx = np.frombuffer(index, dtype="<u2" if kind == "u16" else "<u4").astype(np.int64)
    if idx.size and (idx[-1] >= n or np.any(np.diff(idx) <= 0)):
        raise ProtocolError("shape", "indices must be strictly increasing and below n")
    return idx


# --- public API -------------------------------------------------------------------------


def encode(x: np.ndarray, spec: CodecSpec | str, rng: np.random.Generator) -> Encoded:
    """Encode a flat vector with codec `spec`."""
    if isinstance(spec, str):
        spec = CodecSpec.parse(spec)
    x = np.asarray(x, dtype=np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot encode a vector with NaN or Inf")
    if spec.topk is None:
        data, scale = quantize(x, spec.quant, rng)
        return Encoded(quant=spec.quant, n=x.size, data=data, scale=scale)
    idx = top_k_indices(x, spec.topk)
    data, scale = quantize(x[idx], spec.quant, rng)
    index, kind = encode_index(idx, x.size)
    return Encoded(quant=spec.quant, n=x.size, data=data, scale=scale, index=index, index_kind=kind, k=idx.size)


def decode(enc: Encoded) -> np.ndarray:
    """Dense float32 vector of length `enc.n`; raises ProtocolError on anything inconsistent."""
    if enc.index is None:
        out = dequantize(enc.data, enc.quant, enc.n, enc.scale)
    else:
        idx = decode_index(enc.index, enc.index_kind, enc.n, enc.k)
        out = np.zeros(enc.n, dtype=np.float32)
        out[idx] = dequantize(enc.data, enc.quant, enc.k, enc.scale)
    if not np.isfinite(out).all():
        raise ProtocolError("non_finite", "delta contains NaN or Inf")
    return out


# --- model (downlink) codecs ----------------------------------------------------------------
#
# The global model travels as float32 (default), float16, int8 or int4 (two per byte) with one
# scale per block of `block` parameters (one row of the coefficient matrix; the intercepts form the
# last, shorter block). The scales are float16 (half the bytes: 40 B of an 820-parameter int4 model's 490)
# unless one of them is not a normal float16 (then all are float32, as before); the decoder tells
# them apart by their length. Rounding is deterministic (to nearest): every agent receives the same
# values, and the coordinator remembers exactly those (`decode_params(*encode_params(...))`)
# as the base of the updates trained on them.

MODEL_CODECS = ("float32", "float16", "int8", "int4")
_MODEL_LEVELS = {"int8": 127, "int4": 7}
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_FLOAT16_NORMAL = float(np.finfo(np.float16).tiny)  # the smallest normal float16, 6.1e-5


def _blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def encode_params(params: np.ndarray, codec: str, block: int) -> tuple[bytes, bytes | None]:
    """Encode a flat parameter vector; returns (data, per-block scales or None).

    float16 saturates at +-65504 (rather than sending Inf); int8 is symmetric per block:
    q = round(x / s), s = max|x| / 127 rounded to float16 (1.0 for an all-zero block); int4 the same
    with 7 levels a side (s = max|x| / 7), packed two per byte (`pack_int4`). Scales travel as
    float16 when every one is a normal float16 (its 11-bit significand moves a value by at most
    0.05% of its block's peak, a 280th of an int4 step), else all as float32.
    """
    x = np.asarray(params, dtype=np.float64).ravel()
    if codec == "float32":
        return np.ascontiguousarray(x, dtype="<f4").tobytes(), None
    if codec == "float16":
        return np.clip(x, -_FLOAT16_MAX, _FLOAT16_MAX).astype("<f2").tobytes(), None
    if codec not in _MODEL_LEVELS:
        raise ValueError(f"unknown model codec {codec!r}: use {', '.join(MODEL_CODECS)}")
    levels = _MODEL_LEVELS[codec]
    if block < 1:
        raise ValueError("block must be at least 1")
    n = x.size
    nb = _blocks(n, block)
    padded = np.zeros(nb * block)
    padded[:n] = np.abs(x)
    peaks = padded.reshape(nb, block).max(axis=1) if n else np.zeros(0)
    scales = (peaks / float(levels)).astype(np.float32)
    scales[~(scales > 0)] = 1.0  # zero (or underflowed) blocks quantize to 0
    half = scales.astype(np.float16)
    if np.all(np.abs(half) >= _FLOAT16_NORMAL) and np.isfinite(half).all():
        scales, wire = half.astype(np.float32), half.astype("<f2").tobytes()  # quantize against what travels
    else:
        wire = scales.astype("<f4").tobytes()
    per = np.repeat(scales.astype(np.float64), block)[:n]
    q = np.clip(np.rint(x / per), -levels, levels).astype(np.int8)
    return (q.tobytes() if codec == "int8" else pack_int4(q)), wire


def decode_params(data: bytes, scales: bytes | None, codec: str, n: int, block: int) -> np.ndarray:
    """Inverse of `encode_params`: float32 values; ProtocolError on sizes or non-finite values."""
    if codec not in MODEL_CODECS:
        raise ProtocolError("codec", f"unknown model codec {codec!r}")
    size = {"float32": 4 * n, "float16": 2 * n, "int8": n, "int4": (n + 1) // 2}[codec]
    if len(data) != size:
        raise ProtocolError("shape", f"params has {len(data)} bytes, {codec} x {n} needs {size}")
    if codec in _MODEL_LEVELS:
        if not isinstance(block, int) or isinstance(block, bool) or not 1 <= block <= max(n, 1):
            raise ProtocolError("shape", f"int8 block {block!r} outside [1, {n}]")
        nb = _blocks(n, block)
        if not isinstance(scales, bytes) or len(scales) not in (2 * nb, 4 * nb):
            raise ProtocolError("shape", f"{codec} model needs {nb} float16 or float32 scales")
        s = np.frombuffer(scales, dtype="<f2" if len(scales) == 2 * nb else "<f4").astype(np.float32)
        if not (np.isfinite(s).all() and (s > 0).all()):
            raise ProtocolError("non_finite", f"{codec} model scales must be finite and positive")
        q = np.frombuffer(data, dtype=np.int8, count=n) if codec == "int8" else unpack_int4(data, n)
        if codec == "int4" and (n % 2 and data[-1] >> 4 != 8 or (q < -7).any()):
            raise ProtocolError("shape", "int4 model values must be in [-7, 7] (padding 0)")
        with np.errstate(over="ignore"):
            out = q.astype(np.float32) * np.repeat(s, block)[:n]
    elif codec == "float16":
        out = np.frombuffer(data, dtype="<f2", count=n).astype(np.float32)
    else:
        out = np.frombuffer(data, dtype="<f4", count=n).astype(np.float32)
    if not np.isfinite(out).all():
        raise ProtocolError("non_finite", "model params contain NaN or Inf")
    return out
