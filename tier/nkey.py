"""NATS nkeys and JWTs, as nats-server reads them: ed25519 keys (`cryptography`) in the nkey text form
(base32 of a prefix byte, the key and a CRC-16), and JWTs signed with them (header alg `ed25519-nkey`).

The auth callout (tier/auth.py) needs three things from here: an account key pair whose public key the
node config names as the callout's issuer, the signing of the authorization response and of the user
JWT inside it, and the reading of the server's authorization request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

# the nkey prefix bytes (first base32 character): S seed, A account, U user, N server, X curve (xkey, tier/xkey.py)
PREFIX_SEED = 18 << 3
PREFIX_ACCOUNT = 0
PREFIX_USER = 20 << 3
PREFIX_SERVER = 13 << 3
PREFIX_CURVE = 23 << 3
JWT_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}


def _crc16(data: bytes) -> int:
    """CRC-16/XMODEM (polynomial 0x1021, initial 0): the checksum nkeys append."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=")


def _unb32(text: str) -> bytes:
    return base64.b32decode(text + "=" * (-len(text) % 8))


def _checked(text: str) -> bytes:
    """The payload of an nkey string after its CRC-16 is checked (ValueError if not)."""
    try:
        raw = _unb32(text.strip())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an nkey: {exc}") from None
    if len(raw) < 3 or int.from_bytes(raw[-2:], "little") != _crc16(raw[:-2]):
        raise ValueError("not an nkey: bad checksum")
    return raw[:-2]


def encode_public(prefix: int, key: bytes) -> str:
    raw = bytes([prefix]) + key
    return _b32(raw + _crc16(raw).to_bytes(2, "little"))


def encode_seed(prefix: int, key: bytes) -> str:
    """The nkey seed text (`S` then the kind's letter) of the 32 private bytes `key` of kind `prefix`."""
    raw = bytes([PREFIX_SEED | (prefix >> 5), (prefix & 31) << 3]) + key
    return _b32(raw + _crc16(raw).to_bytes(2, "little"))


def decode_seed(text: str) -> tuple[int, bytes]:
    """The kind prefix and the 32 private bytes of an nkey seed (ValueError if it is none)."""
    raw = _checked(text)
    if len(raw) != 34 or raw[0] & 0xF8 != PREFIX_SEED:
        raise ValueError("not an nkey seed")
    return ((raw[0] & 0x07) << 5) | ((raw[1] & 0xF8) >> 3), raw[2:]


def decode_public(text: str, prefix: int) -> bytes:
    """The 32 key bytes of a public nkey of the given kind (ValueError otherwise)."""
    raw = _checked(text)
    if len(raw) != 33 or raw[0] != prefix:
        raise ValueError(f"not a public nkey of kind {encode_public(prefix, bytes(32))[0]}")
    return raw[1:]


class KeyPair:
    """An ed25519 key pair of one nkey kind (account, user, ...)."""

    def __init__(self, private: Ed25519PrivateKey, prefix: int) -> None:
        self.private = private
        self.prefix = prefix

    @classmethod
    def create(cls, prefix: int = PREFIX_ACCOUNT) -> "KeyPair":
        return cls(Ed25519PrivateKey.generate(), prefix)

    @classmethod
    def from_seed(cls, seed: str) -> "KeyPair":
        """From an nkey seed (`SA...` for an account), as `nsc` and nats-server's tests write them."""
        prefix, key = decode_seed(seed)
        if prefix == PREFIX_CURVE:
            raise ValueError("an xkey seed (curve25519, tier/xkey.py), not a signing key's")
        return cls(Ed25519PrivateKey.from_private_bytes(key), prefix)

    @property
    def seed(self) -> str:
        from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat
        return encode_seed(self.prefix, self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))

    @property
    def public(self) -> str:
        return encode_public(self.prefix, self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_jwt(claims: dict, issuer: KeyPair) -> str:
    """A NATS v2 JWT of `claims` (sub, aud, nats, ...) signed by `issuer`: iss, iat and jti are set here
    (jti: base32 of SHA-512/256 of the claims without it, as the Go library makes it)."""
    claims = {**claims, "iss": issuer.public, "iat": int(time.time())}
    claims.pop("jti", None)
    claims["jti"] = _b32(hashlib.new("sha512_256", json.dumps(claims, separators=(",", ":")).encode()).digest())
    head = _b64(json.dumps(JWT_HEADER, separators=(",", ":")).encode())
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signed = f"{head}.{body}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


def decode_jwt(token: str, issuer_prefix: int) -> dict:
    """The claims of a JWT whose signature verifies with its own `iss` key, of kind `issuer_prefix`
    (ValueError otherwise). It proves the token is whole, not who made it: pin `iss` for that."""
    try:
        head, body, sig = token.strip().split(".")
        header = json.loads(_unb64(head))
        claims = json.loads(_unb64(body))
        if header.get("alg", "").lower() not in ("ed25519-nkey", "ed25519") or not isinstance(claims, dict):
            raise ValueError("not an nkey-signed JWT")
        key = decode_public(str(claims.get("iss", "")), issuer_prefix)
        Ed25519PublicKey.from_public_bytes(key).verify(_unb64(sig), f"{head}.{body}".encode())
    except ValueError:
        raise
    except Exception as exc:  # base64, JSON, signature (InvalidSignature has no message)
        raise ValueError(f"not a valid JWT: {type(exc).__name__} {exc}".rstrip()) from None
    return claims
