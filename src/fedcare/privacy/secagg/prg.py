"""Masks: a 256-bit key expanded by AES-256 in counter mode into a vector of Z_{2^b}.

The full agreed key is the AES key (no folding into a short seed), and the
keystream bytes are the mask, read as little-endian unsigned integers. Every
key is used for exactly one mask: keys are derived fresh per round and purpose.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from numpy.typing import NDArray

_NONCE = bytes(16)
_ZEROS: dict[int, bytes] = {}


def dtype_for(bits: int) -> type[np.unsignedinteger]:
    if bits == 32:
        return np.uint32
    if bits == 64:
        return np.uint64
    raise ValueError(f"masks are 32 or 64 bits, not {bits}")


def expand(key: bytes, length: int, bits: int) -> NDArray[np.unsignedinteger]:
    """``length`` pseudorandom elements of Z_{2^bits} from a 32-byte key."""
    if len(key) != 32:
        raise ValueError("a mask key is 32 bytes")
    n_bytes = length * bits // 8
    zeros = _ZEROS.get(n_bytes)
    if zeros is None:
        # One zero buffer per size; encrypting zeros yields the raw keystream.
        _ZEROS.clear()
        zeros = _ZEROS[n_bytes] = bytes(n_bytes)
    encryptor = Cipher(algorithms.AES256(key), modes.CTR(_NONCE)).encryptor()
    stream = encryptor.update(zeros)
    return np.frombuffer(stream, dtype=np.dtype(dtype_for(bits)).newbyteorder("<"))


def add_mask(target: NDArray[np.unsignedinteger], key: bytes, bits: int, sign: int = 1) -> None:
    """``target += sign * expand(key)`` in Z_{2^bits}, in place."""
    mask = expand(key, target.shape[0], bits)
    if sign > 0:
        np.add(target, mask, out=target)
    else:
        np.subtract(target, mask, out=target)
