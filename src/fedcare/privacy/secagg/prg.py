"""Masks: a 256-bit key expanded by AES-256 in counter mode into a vector of Z_{2^b}.

The full agreed key is the AES key (no folding into a short seed), and the
keystream bytes are the mask, read as little-endian unsigned integers. Every
key is used for exactly one mask: keys are derived fresh per round and purpose.

:func:`expand` defines a mask; :func:`add_masks` is how masks are applied. It
adds many masks into one vector without materialising any of them: each
worker owns a contiguous slice of the vector and one reused keystream buffer,
and starts every key's counter at its slice's first block, so its slice gets
exactly the bytes :func:`expand` would have put there. The cipher and numpy's
add both release the GIL, so workers are threads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from numpy.typing import NDArray

_NONCE = bytes(16)
_BLOCK = 16
# Large enough that a call's overhead is small against its AES work, small
# enough that the buffer and the slice it is added into stay in cache.
CHUNK_BYTES = 1 << 20
# Below this much keystream in one call, starting threads costs more than it saves.
PARALLEL_BYTES = 32 << 20


def dtype_for(bits: int) -> type[np.unsignedinteger]:
    if bits == 32:
        return np.uint32
    if bits == 64:
        return np.uint64
    raise ValueError(f"masks are 32 or 64 bits, not {bits}")


def _check_key(key: bytes) -> None:
    if len(key) != 32:
        raise ValueError("a mask key is 32 bytes")


def _encryptor(key: bytes, first_block: int) -> CipherContext:
    return Cipher(
        algorithms.AES256(key), modes.CTR(first_block.to_bytes(_BLOCK, "big"))
    ).encryptor()


def expand(key: bytes, length: int, bits: int) -> NDArray[np.unsignedinteger]:
    """``length`` pseudorandom elements of Z_{2^bits} from a 32-byte key."""
    _check_key(key)
    encryptor = Cipher(algorithms.AES256(key), modes.CTR(_NONCE)).encryptor()
    stream = encryptor.update(bytes(length * bits // 8))
    return np.frombuffer(stream, dtype=np.dtype(dtype_for(bits)).newbyteorder("<"))


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not every platform has affinity masks (macOS)
        return os.cpu_count() or 1


def add_masks(
    target: NDArray[np.unsignedinteger],
    terms: Sequence[tuple[bytes, int]],
    bits: int,
    workers: int | None = None,
) -> None:
    """``target += sum(sign * expand(key))`` over ``(key, sign)`` terms, in Z_{2^bits}, in place.

    ``workers`` threads share the vector (default: every core when the call
    expands at least :data:`PARALLEL_BYTES` of keystream, else one). No key is
    used before every key has been checked, so a bad key changes nothing.
    """
    dtype = np.dtype(dtype_for(bits)).newbyteorder("<")
    if target.dtype != dtype_for(bits):
        raise ValueError(f"the target holds {target.dtype}, not {bits}-bit elements")
    for key, _ in terms:
        _check_key(key)
    if not terms or target.shape[0] == 0:
        return
    per_block = _BLOCK // dtype.itemsize
    n = target.shape[0]
    if workers is None:
        big = len(terms) * n * dtype.itemsize >= PARALLEL_BYTES
        workers = available_cores() if big else 1
    # Slices start on a cipher block so each worker's counter starts on a whole block.
    blocks = -(-n // per_block)
    per_worker = -(-blocks // max(1, workers)) * per_block
    slices = [(lo, min(lo + per_worker, n)) for lo in range(0, n, per_worker)]

    def run(lo: int, hi: int) -> None:
        chunk = CHUNK_BYTES // dtype.itemsize
        zeros = bytes(min(chunk, hi - lo) * dtype.itemsize)
        # update_into wants room for one block more than it writes.
        scratch = bytearray(len(zeros) + _BLOCK - 1)
        streams = [(_encryptor(key, lo // per_block), sign) for key, sign in terms]
        for start in range(lo, hi, chunk):
            stop = min(start + chunk, hi)
            part = target[start:stop]
            size = (stop - start) * dtype.itemsize
            data = zeros if size == len(zeros) else zeros[:size]
            mask = np.frombuffer(scratch, dtype=dtype, count=stop - start)
            for encryptor, sign in streams:
                encryptor.update_into(data, scratch)
                if sign > 0:
                    np.add(part, mask, out=part)
                else:
                    np.subtract(part, mask, out=part)

    if len(slices) == 1:
        run(*slices[0])
        return
    with ThreadPoolExecutor(len(slices), thread_name_prefix="unmask") as pool:
        for done in [pool.submit(run, lo, hi) for lo, hi in slices]:
            done.result()
