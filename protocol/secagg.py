"""Secure aggregation math (Bonawitz et al., CCS 2017), pure functions: no I/O, no MQTT.

Every agent i of a cohort U (ids sorted, as strings) holds two X25519 key pairs: `c` to
encrypt the shares it sends, `s` to agree pairwise mask seeds. Its masked input is

    y_i = q(x_i) + PRG(b_i) + sum_{j in U1, j > i} PRG(s_ij) - sum_{j in U1, j < i} PRG(s_ij)   (mod 2^32)

where q quantizes the float delta with a scale the cohort shares, b_i is a fresh random
self-mask seed and s_ij = HKDF(X25519(s_sk_i, s_pk_j), round). PRG is the ChaCha20 key
stream read as little-endian uint32. The pairwise masks cancel in the sum over the agents
that sent an input; the coordinator removes the self-masks from t Shamir shares of each b_i,
and the pairwise masks of agents that dropped out after the shares went out from t shares of
their s_sk. Each share is encrypted for its recipient with ChaCha20-Poly1305 under
HKDF(X25519(c_sk_i, c_pk_j), round), the round, sender and recipient as associated data, so a
share replayed from another round or pair, or altered, is refused.

Shamir sharing is this module's own (`split`, `combine`): polynomials over the prime field
GF(2^521 - 1), 32-byte secrets. No maintained, light implementation for byte secrets over a
prime field is on PyPI (the GF(256) ones are unmaintained); this one is tested in
tests/test_secagg.py (any t shares recover, t - 1 reveal nothing checkable, bad inputs refused).
"""

from __future__ import annotations

import functools
import os
import secrets
import struct
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.exceptions import InvalidTag

from protocol.errors import ProtocolError
from protocol.messages import MAX_STR, WireLimits, _unpack, scan

MODULUS_BITS = 32
MODULUS = 2**MODULUS_BITS
# Shamir's field: the Mersenne prime 2^521 - 1 holds any 32-byte secret
PRIME = 2**521 - 1
SHARE_BYTES = 66  # a field element, big-endian
SEED_BYTES = 32


class SecAggError(ValueError):
    """A secure-aggregation input that must be refused (forged, replayed, malformed, too few)."""


# --- keys and seeds ---------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    """One X25519 key pair, as raw 32-byte keys."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh key pair from the OS's generator."""
        sk = X25519PrivateKey.generate()
        return cls(_raw_private(sk), _raw_public(sk.public_key()))

    @classmethod
    def from_private(cls, private: bytes) -> KeyPair:
        """The pair of a raw private key (e.g. one reconstructed from shares)."""
        sk = X25519PrivateKey.from_private_bytes(_check_len(private, 32, "private key"))
        return cls(private, _raw_public(sk.public_key()))


def _raw_private(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _raw_public(pk: X25519PublicKey) -> bytes:
    return pk.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _check_len(value: bytes, n: int, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != n:
        raise SecAggError(f"{what} must be {n} bytes")
    return bytes(value)


def agree(private: bytes, peer_public: bytes, round_id: bytes, purpose: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256 over X25519(private, peer_public), bound to the round."""
    sk = X25519PrivateKey.from_private_bytes(_check_len(private, 32, "private key"))
    try:
        shared = sk.exchange(X25519PublicKey.from_public_bytes(_check_len(peer_public, 32, "public key")))
    except ValueError as exc:  # an all-zero (low-order) point
        raise SecAggError(f"unusable public key: {exc}") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedmq secagg " + purpose + b"|" + round_id).derive(shared)


def pair_seed(s_private: bytes, peer_s_public: bytes, round_id: bytes) -> bytes:
    """The pairwise mask seed s_ij (the same at i and j)."""
    return agree(s_private, peer_s_public, round_id, b"mask")


def share_key(c_private: bytes, peer_c_public: bytes, round_id: bytes) -> bytes:
    """The key that encrypts the shares between two agents in one round."""
    return agree(c_private, peer_c_public, round_id, b"share")


# --- masks -------------------------------------------------------------------------------


def prg(seed: bytes, n: int) -> np.ndarray:
    """`n` uint32 from the ChaCha20 key stream of `seed` (a cryptographic generator)."""
    _check_len(seed, SEED_BYTES, "seed")
    cipher = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(cipher.update(bytes(4 * n)), dtype="<u4").astype(np.uint32)


def check_scale(scale: float, clip: float, k: int) -> None:
    """SecAggError unless k inputs in [-clip, clip] times scale, rounded, sum inside int32 (no wrap-around)."""
    if not (scale > 0 and clip > 0 and k >= 1) or k * (clip * scale + 0.5) >= MODULUS // 2:
        raise SecAggError(f"scale {scale} x clip {clip} x {k} inputs overflows {MODULUS_BITS}-bit sums")


# The sum of honest inputs fills 1/2^8 of the signed 32-bit range: a garbage masked input or reveal
# decodes to values over the whole range, which `check_sum_range` then refuses (each coordinate
# has 255 chances in 256 to show it). The step left is still clip / (k 2^23) or finer.
RANGE_HEADROOM_BITS = 8


def max_scale(clip: float, k: int) -> float:
    """The largest scale at which k inputs clipped to [-clip, clip] cannot overflow the signed sum."""
    return (MODULUS // 2 - 1 - k) / (k * clip)


# Distributed DP: each agent's noise is bounded, in the sum's range, by NOISE_SIGMAS standard deviations
NOISE_SIGMAS = 12


def noise_room(noise: float, k: int) -> float:
    """What the agents' noise (std `noise` each, float units) may add to a sum of k: NOISE_SIGMAS sqrt(k) noise."""
    return NOISE_SIGMAS * noise * float(np.sqrt(k))


def choose_scale(clip: float, k: int, noise: float = 0.0) -> float:
    """The scale a cohort quantizes with: k inputs in [-clip, clip] plus the agents' noise (distributed
    DP) fill 1/2^RANGE_HEADROOM_BITS of the signed 32-bit range."""
    scale = (MODULUS // 2 - 1 - k) / (k * clip + noise_room(noise, k)) / 2**RANGE_HEADROOM_BITS
    check_scale(scale, clip, k)
    return scale


# The adaptive per-coordinate clip (`adapt_clip`): a geometric step towards the clip that leaves
# `target` of the coordinates clipped, from the cohort's securely summed count of clipped coordinates
CLIP_RATE = 5.0
CLIP_BOUNDS = (1e-6, 1e6)


def clipped_count(delta: np.ndarray, clip: float) -> int:
    """How many coordinates of `delta` the per-coordinate clip changes."""
    return int(np.count_nonzero(np.abs(np.asarray(delta, dtype=np.float64)) > clip))


def adapt_clip(clip: float, clipped_fraction: float, target: float, rate: float = CLIP_RATE) -> float:
    """The next cohort's clip: clip * exp(rate * (fraction clipped - target)), within CLIP_BOUNDS.

    A geometric update as in adaptive clipping for federated learning (Andrew et al., 2021), on the
    fraction of coordinates clipped rather than of updates: with 68% clipped and a 1% target the clip
    grows 28-fold in one round; with none clipped it shrinks by 5% a round until `target` are.
    """
    if not 0 <= clipped_fraction <= 1 or not 0 < target < 1:
        raise SecAggError(f"clipped fraction {clipped_fraction} or target {target} outside [0, 1]")
    lo, hi = CLIP_BOUNDS
    return float(min(hi, max(lo, clip * np.exp(rate * (clipped_fraction - target)))))


def quantize(delta: np.ndarray, scale: float, clip: float) -> np.ndarray:
    """Round clip(delta, -clip, clip) * scale to integers, as uint32 mod 2^32."""
    q = np.rint(np.clip(np.asarray(delta, dtype=np.float64), -clip, clip) * scale).astype(np.int64)
    return (q % MODULUS).astype(np.uint32)


def quantization_margin(n: int, scale: float) -> float:
    """How far rounding `n` coordinates at `scale` can move a vector in L2 norm: sqrt(n) / (2 scale)."""
    return float(np.sqrt(n)) / (2 * scale)


def clip_l2(delta: np.ndarray, l2_clip: float, scale: float) -> np.ndarray:
    """`delta` scaled down so that its quantization at `scale` has L2 norm <= `l2_clip` (central DP's C)."""
    delta = np.asarray(delta, dtype=np.float64)
    bound = l2_clip - quantization_margin(delta.size, scale)
    if not bound > 0:
        raise SecAggError(f"L2 clip {l2_clip} is below the quantization step")
    norm = float(np.linalg.norm(delta))
    return delta * (bound / norm) if norm > bound else delta


def add_noise(x: np.ndarray, noise: float, scale: float) -> np.ndarray:
    """A quantized input plus this agent's share of distributed DP noise: a discrete Gaussian of std
    noise x scale on the integers (the quantization lattice), drawn from the OS CSPRNG."""
    from protocol.privacy import discrete_gaussian, secure_rng

    z = discrete_gaussian(x.size, noise * scale, secure_rng()).astype(np.int64)
    return ((np.asarray(x, dtype=np.uint32).astype(np.int64) + z) % MODULUS).astype(np.uint32)


def dequantize_sum(total: np.ndarray, scale: float) -> np.ndarray:
    """The float sum of a sum of quantized inputs (read as signed 32-bit)."""
    return np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.float64) / scale


def mask(
    me: str, x: np.ndarray, self_seed: bytes, s_private: bytes, peers_s_public: dict[str, bytes], round_id: bytes
) -> np.ndarray:
    """y = x + PRG(b) + pairwise masks with every peer (added towards larger ids, subtracted towards smaller)."""
    x = np.asarray(x, dtype=np.uint32)
    y = x + prg(self_seed, x.size)
    for peer, public in peers_s_public.items():
        if peer == me:
            continue
        m = prg(pair_seed(s_private, public, round_id), x.size)
        y = y + m if me < peer else y - m
    return y


def unmask(
    masked: dict[str, np.ndarray],
    self_seeds: dict[str, bytes],
    dropped_s_private: dict[str, bytes],
    s_public: dict[str, bytes],
    round_id: bytes,
) -> np.ndarray:
    """The sum of the survivors' quantized inputs (uint32).

    `masked`: survivors' y; `self_seeds`: their b; `dropped_s_private`: s_sk of the agents
    that sent shares but no input; `s_public`: s_pk of everyone in U1.
    """
    if set(self_seeds) != set(masked):
        raise SecAggError("a self-mask seed is needed for every survivor, and only for them")
    if set(dropped_s_private) & set(masked):
        raise SecAggError("an agent cannot be both a survivor and dropped")
    n = next(iter(masked.values())).size
    total = np.zeros(n, dtype=np.uint32)
    for y in masked.values():
        if y.size != n:
            raise SecAggError("masked inputs of different lengths")
        total = total + y
    for seed in self_seeds.values():
        total = total - prg(seed, n)
    for dropped, private in dropped_s_private.items():
        for survivor in masked:
            m = prg(pair_seed(private, s_public[survivor], round_id), n)
            # the survivor added m if it is the smaller id, subtracted it if larger: take that back
            total = total - m if survivor < dropped else total + m
    return total


def new_seed() -> bytes:
    """A fresh 32-byte self-mask seed."""
    return os.urandom(SEED_BYTES)


# --- Shamir secret sharing over GF(2^521 - 1) ------------------------------------------------


def split(secret: bytes, t: int, xs: list[int]) -> dict[int, int]:
    """Shares of a 32-byte `secret` at the points `xs` (distinct, 1..PRIME-1); any `t` recover it."""
    _check_len(secret, SEED_BYTES, "secret")
    if not 1 <= t <= len(xs):
        raise SecAggError(f"threshold {t} must be in 1..{len(xs)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise SecAggError("share points must be distinct and nonzero")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


@functools.lru_cache(maxsize=4096)
def _lagrange(xs: tuple[int, ...], at: int) -> tuple[int, ...]:
    """The Lagrange coefficients at `at` for the points `xs`: the same for every secret of a round
    (its share points are the members' positions), so each is computed once."""
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def _interpolate(points: list[tuple[int, int]], at: int) -> int:
    """The value at `at` of the polynomial of degree len(points) - 1 through `points` (Lagrange)."""
    coefficients = _lagrange(tuple(x for x, _ in points), at)
    return sum(y * c for (_, y), c in zip(points, coefficients)) % PRIME


def _checked_points(shares: dict[int, int], t: int) -> list[tuple[int, int]]:
    if len(shares) < t or t < 1:
        raise SecAggError(f"{len(shares)} share(s), {t} needed")
    points = sorted(shares.items())
    if any(not 0 < x < PRIME or not 0 <= y < PRIME for x, y in points):
        raise SecAggError("a share is outside the field")
    return points


def _as_secret(value: int) -> bytes | None:
    return value.to_bytes(SEED_BYTES, "big") if value < 2 ** (8 * SEED_BYTES) else None


def combine(shares: dict[int, int], t: int) -> bytes:
    """The secret from at least `t` shares {x: y} (Lagrange at 0 over the first t)."""
    secret = _as_secret(_interpolate(_checked_points(shares, t)[:t], 0))
    if secret is None:
        raise SecAggError("shares do not combine to a 32-byte secret (inconsistent shares)")
    return secret


# t-subsets tried to find shares that give a committed secret: C(10, 6) = 210 covers any
# cohort of 10 with t = 6; past the bound the secret is refused as unrecoverable
MAX_SUBSETS = 5000


def combine_verified(shares: dict[int, int], t: int, check) -> tuple[bytes, list[int]]:
    """(the secret, the points of the shares off its polynomial) from shares {x: y}.

    `check(secret)` says whether a candidate is the committed secret (its hash, or the public key
    of a private key). The first t shares are tried, then other t-subsets (at most MAX_SUBSETS),
    until one gives a secret that checks; every share beyond those t is then cross-checked against
    their polynomial, so an altered share is found whether or not it was among the first t.
    SecAggError when no t shares give a secret that checks.
    """
    points = _checked_points(shares, t)
    from itertools import combinations, islice

    for subset in islice(combinations(points, t), MAX_SUBSETS):
        secret = _as_secret(_interpolate(list(subset), 0))
        if secret is not None and check(secret):
            base = list(subset)
            off = [x for x, y in points if (x, y) not in subset and _interpolate(base, x) != y]
            return secret, off
    raise SecAggError(f"no {t} of {len(points)} shares give the committed secret")


def seed_commitment(seed: bytes, key_id: bytes) -> bytes:
    """SHA-256 of a self-mask seed, bound to the key announcement that carries it."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"fedmq secagg seed|" + _check_len(key_id, 16, "key id") + _check_len(seed, SEED_BYTES, "seed"))
    return digest.finalize()


def check_sum_range(total: np.ndarray, count: int, scale: float, clip: float, noise: float = 0.0) -> None:
    """SecAggError unless every coordinate of a decoded sum of `count` quantized inputs is one the honest
    inputs could make: |sum| <= count * (clip * scale + 1/2), plus `noise_room` with distributed DP.
    A garbage masked input or reveal decodes to values spread over the whole int32 range."""
    signed = np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.int64)
    bound = count * (clip * scale + 0.5) + noise_room(noise, count) * scale
    worst = int(np.abs(signed).max()) if signed.size else 0
    if worst > bound:
        raise SecAggError(f"the decoded sum reaches {worst / scale:.3g}, past {count} inputs of at most {clip}")


# --- encrypted shares --------------------------------------------------------------------

_SHARE_PLAIN = struct.Struct(f">H{SHARE_BYTES}s{SHARE_BYTES}s")  # x, share of b, share of s_sk


def _aad(round_id: bytes, sender: str, recipient: str) -> bytes:
    return b"fedmq secagg share|" + round_id + b"|" + sender.encode() + b"|" + recipient.encode()


def seal_share(key: bytes, round_id: bytes, sender: str, recipient: str, x: int, b_share: int, s_share: int) -> bytes:
    """ChaCha20-Poly1305 of (x, share of b, share of s_sk), bound to the round, sender and recipient."""
    nonce = os.urandom(12)
    plain = _SHARE_PLAIN.pack(x, b_share.to_bytes(SHARE_BYTES, "big"), s_share.to_bytes(SHARE_BYTES, "big"))
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plain, _aad(round_id, sender, recipient))


def open_share(key: bytes, round_id: bytes, sender: str, recipient: str, sealed: bytes) -> tuple[int, int, int]:
    """(x, share of b, share of s_sk); SecAggError if forged, altered or from another round or pair."""
    if not isinstance(sealed, (bytes, bytearray)) or len(sealed) != 12 + _SHARE_PLAIN.size + 16:
        raise SecAggError("a share of the wrong size")
    try:
        plain = ChaCha20Poly1305(key).decrypt(bytes(sealed[:12]), bytes(sealed[12:]), _aad(round_id, sender, recipient))
    except InvalidTag:
        raise SecAggError(f"share from {sender} to {recipient} refused: forged, altered or of another round") from None
    x, b, s = _SHARE_PLAIN.unpack(plain)
    return x, int.from_bytes(b, "big"), int.from_bytes(s, "big")


def share_points(members: list[str]) -> dict[str, int]:
    """Each member's Shamir point: its 1-based position in the sorted cohort."""
    return {agent: i + 1 for i, agent in enumerate(sorted(members))}


# --- wire messages (msgpack maps; the topic names the sender) ----------------------------

MAX_SECAGG_BYTES = 64 * 1024 * 1024
MAX_MEMBERS = 10_000  # the largest cohort a message may describe, unless the reader knows its own K
MAX_FIELD_BYTES = 1024  # a key, a sealed share, a share of a seed: each far smaller


def limits(kind: str, *, members: int = MAX_MEMBERS, n_params: int | None = None) -> tuple[int, WireLimits]:
    """The largest `kind` message for a cohort of `members` (and a masked input of `n_params`),
    and its msgpack bounds: checked before anything is decoded (issue 18: one 8 MiB key
    message of empty arrays cost the coordinator 606 MB once built)."""
    if kind == "masked":
        vector = 4 * n_params if n_params is not None else MAX_SECAGG_BYTES
        return 1024 + vector, WireLimits(max_objects=64, max_depth=3, max_array=16, max_map=16, max_bin=vector)
    per_member = 2 * (MAX_STR + 3 + MAX_FIELD_BYTES + 5)  # a reveal holds two maps of the cohort
    return (min(MAX_SECAGG_BYTES, 1024 + (members + 1) * per_member),
            WireLimits(max_objects=64 + 10 * (members + 1), max_depth=3, max_array=members + 1,
                       max_map=max(16, members + 1), max_bin=MAX_FIELD_BYTES))


def encode(kind: str, **fields) -> bytes:
    """A secure-aggregation message of `kind` (key, cohort, share, inbox, masked, unmask, reveal)."""
    import msgpack

    return msgpack.packb({"type": kind, **fields}, use_bin_type=True)


def decode(payload: bytes, kind: str, *, members: int = MAX_MEMBERS, n_params: int | None = None) -> dict:
    """The fields of a `kind` message, bounded before decoding by `limits`; SecAggError for anything else."""
    max_bytes, bounds = limits(kind, members=members, n_params=n_params)
    if not isinstance(payload, (bytes, bytearray)):
        raise SecAggError("not a secure-aggregation message (size)")
    try:
        message = _unpack(payload, max_bytes, bounds)
        scan(payload, bounds)  # below SCAN_ABOVE_BYTES _unpack let ~1,000 nested arrays through (rare messages: cheap)
    except ProtocolError as exc:
        raise SecAggError(f"refused {kind} message: {exc}") from None
    if not isinstance(message, dict) or message.get("type") != kind:
        raise SecAggError(f"expected a {kind} message")
    return message


def pack_vector(y: np.ndarray) -> bytes:
    """uint32 little-endian bytes of a masked input."""
    return np.ascontiguousarray(y, dtype="<u4").tobytes()


def unpack_vector(raw: bytes, n: int) -> np.ndarray:
    """The masked input of `n` uint32; SecAggError on a wrong length."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != 4 * n:
        raise SecAggError(f"a masked input must be {4 * n} bytes")
    return np.frombuffer(raw, dtype="<u4").astype(np.uint32)
