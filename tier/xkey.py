"""NATS xkeys: curve25519 key pairs in the nkey text form (seed `SX...`, public `X...`, tier/nkey.py) and the sealing
nats-server's auth callout does with them, as the nkeys library's Seal and Open: `xkv1`, a random 24-byte nonce,
then a NaCl box (curve25519-xsalsa20-poly1305) from the sender's private key to the recipient's public key.

With `auth_callout.xkey` (tier/cluster.py `callout_authorization`) a node seals each authorization request, a
device's password inside, to the service's xkey and names its own in the `Nats-Server-Xkey` header; tier/auth.py
opens it and seals its answer to that key. PyNaCl does the box: `cryptography` has X25519 but no XSalsa20-Poly1305.
"""

from __future__ import annotations

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from tier.nkey import PREFIX_CURVE, decode_public, decode_seed, encode_public, encode_seed

VERSION = b"xkv1"  # the nkeys library's only sealing version
NONCE_BYTES = 24
SERVER_XKEY_HEADER = "Nats-Server-Xkey"  # the node's public xkey, beside an encrypted request
BOXES = 64  # peers' boxes kept (a box's key exchange is most of a seal's cost); a tier has a few nodes


class XKey:
    """A curve25519 key pair of the nkey kind X: seals to and opens from other xkeys' public keys."""

    def __init__(self, private: PrivateKey) -> None:
        self.private = private
        self._boxes: dict[str, Box] = {}

    @classmethod
    def create(cls) -> "XKey":
        return cls(PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: str) -> "XKey":
        """From an xkey seed (`SX...`, as the nkeys library writes one); ValueError for any other text."""
        prefix, key = decode_seed(seed)
        if prefix != PREFIX_CURVE:
            raise ValueError("not an xkey seed (SX...)")
        return cls(PrivateKey(key))

    @property
    def seed(self) -> str:
        return encode_seed(PREFIX_CURVE, bytes(self.private))

    @property
    def public(self) -> str:
        return encode_public(PREFIX_CURVE, bytes(self.private.public_key))

    def _box(self, other: str) -> Box:
        """The box with the peer xkey `other` (X...), made once: its curve25519 exchange costs more than sealing."""
        box = self._boxes.get(other)
        if box is None:
            box = Box(self.private, PublicKey(decode_public(other, PREFIX_CURVE)))
            if len(self._boxes) >= BOXES:  # headers naming ever new keys (no node's) bound it
                self._boxes.clear()
            self._boxes[other] = box
        return box

    def seal(self, plaintext: bytes, recipient: str) -> bytes:
        """`plaintext` for the holder of the xkey `recipient` (X...) alone, from this key."""
        return VERSION + bytes(self._box(recipient).encrypt(plaintext))

    def open(self, sealed: bytes, sender: str) -> bytes:
        """What `sender` (X...) sealed to this key: ValueError if it is not of the framing, not to this key, not
        from that sender, or changed on the way."""
        if len(sealed) <= len(VERSION) + NONCE_BYTES or not sealed.startswith(VERSION):
            raise ValueError(f"not a sealed {VERSION.decode()} message ({len(sealed)} bytes)")
        try:
            return self._box(sender).decrypt(sealed[len(VERSION):])
        except CryptoError:
            raise ValueError("it does not open with this xkey from that sender (another key, or changed)") from None
