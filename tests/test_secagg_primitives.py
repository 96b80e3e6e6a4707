"""The building blocks of secure aggregation: Shamir, masks, graphs, key agreement."""

from __future__ import annotations

import itertools
import secrets
import threading

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import CipherContext

from fedcare.privacy.secagg import prg, shamir
from fedcare.privacy.secagg.graph import default_degree, neighbourhoods
from fedcare.privacy.secagg.keys import agree, new_exchange_key, public_bytes
from fedcare.privacy.secagg.prg import add_masks, expand


def test_any_threshold_shares_recover_and_fewer_do_not():
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    for subset in itertools.combinations(shares, 3):
        assert shamir.reconstruct({x: shares[x] for x in subset}, 3, 32) == secret
    with pytest.raises(ValueError, match="3 needed"):
        shamir.reconstruct({1: shares[1], 2: shares[2]}, 3, 32)
    # Two shares interpolated as if they were enough give something else.
    guess = shamir.reconstruct({1: shares[1], 2: shares[2]}, 2, 33)
    assert guess[-32:] != secret


def test_masks_come_from_the_whole_key():
    key = secrets.token_bytes(32)
    a = expand(key, 1000, 32)
    assert a.dtype == np.uint32
    assert a.shape == (1000,)
    assert np.array_equal(a, expand(key, 1000, 32))
    # Changing only the last byte of the key changes the mask: nothing is folded away.
    other = key[:-1] + bytes([key[-1] ^ 1])
    assert np.mean(a == expand(other, 1000, 32)) < 0.01
    b = expand(key, 500, 64)
    assert b.dtype == np.uint64
    assert np.array_equal(b.view(np.uint32), a)


def _reference(start: np.ndarray, terms: list[tuple[bytes, int]], bits: int) -> np.ndarray:
    out = start.copy()
    for key, sign in terms:
        mask = expand(key, start.shape[0], bits)
        out = out + mask if sign > 0 else out - mask
    return out


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("workers", [1, 2, 3, 7])
# Lengths that are not a whole number of cipher blocks, chunks or worker slices.
@pytest.mark.parametrize("length", [1, 3, 1001, 70_003])
def test_masks_added_in_place_across_workers_equal_the_masks_one_by_one(
    bits: int, workers: int, length: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small chunks, so each worker's slice spans several chunks of one reused buffer.
    monkeypatch.setattr(prg, "CHUNK_BYTES", 4096)
    rng = np.random.default_rng(length)
    dtype = prg.dtype_for(bits)
    start = rng.integers(0, np.iinfo(dtype).max, size=length, dtype=dtype, endpoint=True)
    terms = [(secrets.token_bytes(32), sign) for sign in (1, -1, -1, 1, 1)]
    target = start.copy()
    add_masks(target, terms, bits, workers=workers)
    assert np.array_equal(target, _reference(start, terms, bits))
    # Adding the opposite masks gives the start back.
    add_masks(target, [(key, -sign) for key, sign in terms], bits, workers=workers)
    assert np.array_equal(target, start)


def test_a_large_call_splits_the_vector_over_worker_threads_and_gives_the_same_sum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(prg, "PARALLEL_BYTES", 1)
    monkeypatch.setattr(prg, "available_cores", lambda: 2)
    monkeypatch.setattr(prg, "CHUNK_BYTES", 4096)
    seen: set[tuple[str, int]] = set()
    written: list[int] = []
    real = prg._encryptor

    class Recording:
        """The real encryptor, noting how many bytes each call writes."""

        def __init__(self, inner: CipherContext) -> None:
            self.inner = inner

        def update_into(self, data: bytes, buf: bytearray) -> int:
            written.append(len(data))
            return self.inner.update_into(data, buf)

    def spy(key: bytes, first_block: int) -> Recording:
        seen.add((threading.current_thread().name[:6], first_block))
        return Recording(real(key, first_block))

    monkeypatch.setattr(prg, "_encryptor", spy)
    start = np.zeros(10_000, dtype=np.uint32)
    terms = [(secrets.token_bytes(32), 1), (secrets.token_bytes(32), -1)]
    target = start.copy()
    add_masks(target, terms, 32)
    # Two slices of 5,000 elements: the second's counter starts at block 1,250.
    assert seen == {("unmask", 0), ("unmask", 1250)}
    # No mask is held whole: the keystream goes through a chunk-sized buffer.
    assert max(written) == 4096
    assert sum(written) == 2 * 10_000 * 4
    assert np.array_equal(target, _reference(start, terms, 32))


def test_a_bad_key_or_width_changes_nothing() -> None:
    start = np.arange(100, dtype=np.uint32)
    target = start.copy()
    with pytest.raises(ValueError, match="32 bytes"):
        add_masks(target, [(secrets.token_bytes(32), 1), (b"short", 1)], 32)
    assert np.array_equal(target, start)
    with pytest.raises(ValueError, match="not 64-bit"):
        add_masks(target, [(secrets.token_bytes(32), 1)], 64)
    assert np.array_equal(target, start)


def test_key_agreement_is_symmetric_and_labelled():
    one, two = new_exchange_key(), new_exchange_key()
    k1 = agree(one, public_bytes(two), b"mask")
    assert k1 == agree(two, public_bytes(one), b"mask")
    assert len(k1) == 32
    assert k1 != agree(one, public_bytes(two), b"share")


@pytest.mark.parametrize("n", [5, 20, 100])
def test_sparse_graph_is_regular_symmetric_and_public(n):
    sites = [f"s{i:03d}" for i in range(n)]
    k = default_degree(n)
    graph = neighbourhoods(sites, k, seed=3)
    assert graph == neighbourhoods(list(reversed(sites)), k, seed=3)
    assert all(len(v) == k for v in graph.values())
    assert all(a in graph[b] for a in graph for b in graph[a])
    if k < n - 1:
        assert graph != neighbourhoods(sites, k, seed=4)
    assert default_degree(100) < 30
