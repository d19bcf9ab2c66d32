"""The arithmetic of secure aggregation: key agreement, the mask PRG, share encryption, the fixed-point ring.

- Key agreement: X25519 (`cryptography`); a shared secret goes through HKDF-SHA256 with a label and the
  round, so that every use (a pairwise mask, a share-encryption key) gets its own 32-byte key.
- Masks: the ChaCha20 keystream of a 32-byte seed (a cryptographic PRG), read as little-endian uint64.
- Shares travel from client to client through the server encrypted with AES-256-GCM under a key only the
  two clients can agree on; the associated data binds sender, receiver and round.
- The ring: Z_{2^64}. A float v is encoded as round(v * 2^FRACTION_BITS) in two's complement; sums wrap
  modulo 2^64 (numpy uint64 arithmetic), and a sum decodes correctly while its true value stays within
  +-2^(63 - FRACTION_BITS). Each client's rounding moves a coordinate by at most 2^-(FRACTION_BITS + 1), so a
  sum over n clients is within n * 2^-(FRACTION_BITS + 1) of the exact float64 sum (`quantization_bound`).
"""

from __future__ import annotations

import os

import numpy as np

from partita.errors import FLError

try:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
except ImportError as exc:  # an optional extra: say how to get it
    raise FLError("Secure aggregation needs the 'cryptography' package: pip install 'partita[secure]'.") from exc

FRACTION_BITS = 32
_SCALE = float(2**FRACTION_BITS)
_LIMIT = 2.0 ** (62 - FRACTION_BITS)  # per-client bound: leaves headroom for sums over many clients
_NONCE = b"\0" * 16  # ChaCha20's 16-byte nonce; every seed is used for one mask only


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def private_key_from(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: X25519PrivateKey, peer_public: bytes, label: str, context: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256(X25519(private, peer), info = label | context)."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # a malformed or low-order public key from the network
        raise FLError(f"A secure-aggregation public key is invalid: {exc}") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label.encode() + b"|" + context).derive(
        shared
    )


def mask(seed: bytes, length: int) -> np.ndarray:
    """`length` pseudo-random uint64 from a 32-byte seed (ChaCha20 keystream)."""
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * length)), dtype="<u8").astype(np.uint64)


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag

    try:
        return AESGCM(key).decrypt(ciphertext[:12], ciphertext[12:], associated)
    except (InvalidTag, ValueError):  # tampered, misrouted or truncated: refuse, never guess
        raise FLError("A secure-aggregation share failed authentication; it was altered or misrouted.") from None


def quantize(values: np.ndarray) -> np.ndarray:
    """float64 -> the ring Z_{2^64} (uint64), round to nearest; FLError when a value is out of range."""
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)) or (values.size and np.max(np.abs(values)) >= _LIMIT):
        raise FLError(
            f"An update holds a value beyond +-2^{62 - FRACTION_BITS} (or not finite); it cannot be masked "
            "in the fixed-point ring. Lower the learning rate."
        )
    return np.rint(values * _SCALE).astype(np.int64).view(np.uint64)


def dequantize(ring: np.ndarray) -> np.ndarray:
    """The ring's two's-complement reading back as float64."""
    return np.asarray(ring, dtype=np.uint64).view(np.int64).astype(np.float64) / _SCALE


def quantization_bound(clients: int) -> float:
    """The most a sum of `clients` quantised values can differ from the exact float64 sum, per coordinate."""
    return clients * 0.5 / _SCALE
