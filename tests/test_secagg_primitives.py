"""The building blocks of secure aggregation: Shamir, masks, graphs, key agreement."""

from __future__ import annotations

import itertools
import secrets

import numpy as np
import pytest

from fedcare.privacy.secagg import shamir
from fedcare.privacy.secagg.graph import default_degree, neighbourhoods
from fedcare.privacy.secagg.keys import agree, new_exchange_key, public_bytes
from fedcare.privacy.secagg.prg import expand


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
