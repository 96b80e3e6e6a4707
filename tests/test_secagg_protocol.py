"""SecAgg+: the unmasked sum is the plain weighted sum, and honest parties refuse attacks."""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare import pki
from fedcare.fixed_point import plan_quantization
from fedcare.privacy.secagg.aggregator import SecAggFailedError, SecAggServer, ServerStage
from fedcare.privacy.secagg.client import SecAggClient
from fedcare.privacy.secagg.inmemory import (
    Identities,
    client_for,
    make_identities,
    run_local_round,
)
from fedcare.privacy.secagg.keys import EcdsaSigner, IdentityVerifier, SecAggError
from fedcare.privacy.secagg.messages import UnmaskRequest
from fedcare.privacy.secagg.protocol import Stage
from fedcare.privacy.secagg.quantize import decode_sum, encode, quantize_weight
from fedcare.privacy.secagg.session import RoundSetup, round_setup

STUDY = "ab" * 32
TASK = "cd" * 32
SITES = tuple(f"site{i}" for i in range(8))


@lru_cache(maxsize=1)
def identities() -> Identities:
    return make_identities(SITES)


def setup_for(n: int, d: int, degree: int | None = None, fraction: float = 0.6) -> RoundSetup:
    return round_setup(
        STUDY,
        1,
        SITES[:n],
        task_sha256=TASK,
        degree=degree,
        threshold_fraction=fraction,
        seed=5,
        bits=32,
        length=d + 1,
    )


def _inputs(n: int, d: int, seed: int, plan_sites: int = 8) -> tuple:
    plan = plan_quantization(32, 1.0, plan_sites)
    rng = np.random.default_rng(seed)
    deltas = {s: (rng.normal(size=d) * rng.uniform(0.01, 2)).astype(np.float32) for s in SITES[:n]}
    weights = {s: float(rng.uniform(0.001, 1.0)) for s in SITES[:n]}
    encoded = {s: encode(deltas[s], weights[s], plan, rng) for s in SITES[:n]}
    return plan, deltas, weights, encoded


def _expected(plan, deltas, weights, sites):
    from fedcare.privacy.secagg.quantize import clip_l2

    total = np.zeros(next(iter(deltas.values())).shape[0])
    wsum = 0.0
    for s in sites:
        w = quantize_weight(weights[s], plan) / plan.weight_scale
        total += w * clip_l2(deltas[s], plan.clip_norm)
        wsum += w
    return total, wsum


drop_choice = st.sampled_from([None, Stage.SHARES, Stage.MASKED, Stage.CONFIRM, Stage.UNMASK])


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 8),
    d=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    pattern=st.lists(drop_choice, min_size=8, max_size=8),
)
def test_sum_equals_weighted_sum_complete_graph(n, d, seed, pattern):
    plan, deltas, weights, encoded = _inputs(n, d, seed)
    setup = setup_for(n, d)
    drops = {s: p for s, p in zip(SITES[:n], pattern, strict=False) if p is not None}
    shared = [s for s in SITES[:n] if drops.get(s) is not Stage.SHARES]
    submitted = [s for s in shared if drops.get(s) is not Stage.MASKED]
    confirmed = [s for s in submitted if drops.get(s) is not Stage.CONFIRM]
    answering = [s for s in confirmed if drops.get(s) is not Stage.UNMASK]
    if min(len(shared), len(submitted), len(confirmed), len(answering)) < setup.threshold:
        with pytest.raises(SecAggError):
            run_local_round(setup, encoded, identities(), drops)
        return
    total, survivors = run_local_round(setup, encoded, identities(), drops)
    assert survivors == tuple(submitted)
    got, wsum = decode_sum(total, plan)
    want, want_w = _expected(plan, deltas, weights, submitted)
    assert np.max(np.abs(got - want)) <= plan.error_bound(len(submitted)) + 1e-9
    assert wsum == pytest.approx(want_w, abs=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(5, 8),
    seed=st.integers(0, 2**16),
    dropped=st.lists(st.sampled_from(SITES), max_size=2, unique=True),
)
def test_sparse_graph_sum_or_clean_failure(n, seed, dropped):
    d = 17
    plan, deltas, weights, encoded = _inputs(n, d, seed)
    setup = setup_for(n, d, degree=4, fraction=0.6)
    assert all(len(v) == 4 for v in setup.neighbours.values())
    drops = {s: Stage.MASKED for s in dropped if s in encoded}
    try:
        total, survivors = run_local_round(setup, encoded, identities(), drops)
    except SecAggError:
        assert drops, "a round without dropouts must succeed"
        return
    got, _ = decode_sum(total, plan)
    want, _ = _expected(plan, deltas, weights, survivors)
    assert set(survivors) == set(encoded) - set(drops)
    assert np.max(np.abs(got - want)) <= plan.error_bound(len(survivors)) + 1e-9


def _through_masking(n: int = 4, d: int = 6):
    """A server and clients that have all submitted masked inputs."""
    encoded = _inputs(n, d, 1)[3]
    setup = setup_for(n, d)
    ids = identities()
    server = SecAggServer(setup, ids.verifier)
    clients = {
        s: SecAggClient(setup, s, ids.signers[s], ids.signers[s].certificate_pem, ids.verifier)
        for s in setup.sites
    }
    for c in clients.values():
        server.receive_advertisement(c.advertise())
    server.close_advertising()
    for s, c in clients.items():
        server.receive_shares(c.share_keys(server.advertisements_for(s)))
    server.close_sharing()
    return setup, server, clients, encoded


def _request(setup, survivors, dropped):
    return UnmaskRequest(
        study_hash=STUDY, round=1, session=setup.session, survivors=survivors, dropped=dropped
    )


def test_site_refuses_an_inconsistent_survivor_list_and_signs_only_once():
    setup, server, clients, encoded = _through_masking()
    for s, c in clients.items():
        server.receive_masked(s, c.masked_input(server.shares_for(s), encoded[s]))
    sites = setup.sites
    site = clients[sites[0]]
    # Asked to treat itself as dropped: it knows it submitted.
    with pytest.raises(SecAggError, match="submitted"):
        site.confirm(_request(setup, sites[1:], sites[:1]))
    # A peer listed both as submitted and as dropped.
    with pytest.raises(SecAggError, match="both"):
        site.confirm(_request(setup, sites, sites[1:2]))
    # A name that is no participant of the session, to pad the survivor count.
    with pytest.raises(SecAggError, match="not in this session"):
        site.confirm(_request(setup, (*sites[:2], "ghost"), sites[2:]))
    # A neighbour that sent shares left out of both lists.
    with pytest.raises(SecAggError, match="does not match"):
        site.confirm(_request(setup, sites[:3], ()))
    # A request for another session (another task or participant list).
    other = dataclasses.replace(setup, task_sha256="ef" * 32)
    with pytest.raises(SecAggError, match="another secure session"):
        site.confirm(_request(other, sites, ()))
    signed = site.confirm(_request(setup, sites, ()))
    assert signed.site == sites[0]
    # One signature per session: a second request, even a consistent one, is refused.
    with pytest.raises(SecAggError, match="cannot confirm"):
        site.confirm(_request(setup, sites[:3], sites[3:]))


def test_tampered_redirected_and_replayed_shares_are_rejected():
    setup, server, clients, encoded = _through_masking()
    site = setup.sites[0]
    shares = list(server.shares_for(site))
    bad = bytearray(shares[0].ciphertext)
    bad[20] ^= 1
    tampered = [shares[0].model_copy(update={"ciphertext": bytes(bad)}), *shares[1:]]
    with pytest.raises(SecAggError, match="authentication"):
        clients[site].masked_input(tampered, encoded[site])
    # A share meant for another site, relabelled for this one, does not open.
    other = server.shares_for(setup.sites[1])
    stolen = next(s for s in other if s.sender != site)
    redirected = [s for s in shares if s.sender != stolen.sender]
    redirected.append(stolen.model_copy(update={"recipient": site}))
    with pytest.raises(SecAggError, match="authentication"):
        clients[site].masked_input(redirected, encoded[site])
    with pytest.raises(SecAggError, match="replayed"):
        clients[site].masked_input([*shares, shares[0]], encoded[site])
    # A share from this round replayed into the next round: new keys, new context.
    setup2 = dataclasses.replace(setup, round=2)
    ids = identities()
    later = {
        s: SecAggClient(setup2, s, ids.signers[s], ids.signers[s].certificate_pem, ids.verifier)
        for s in setup2.sites
    }
    server2 = SecAggServer(setup2, ids.verifier)
    for c in later.values():
        server2.receive_advertisement(c.advertise())
    server2.close_advertising()
    for s, c in later.items():
        server2.receive_shares(c.share_keys(server2.advertisements_for(s)))
    server2.close_sharing()
    fresh = list(server2.shares_for(site))
    relabelled = shares[0].model_copy(update={"round": 2})
    with pytest.raises(SecAggError, match="another secure session"):
        later[site].masked_input(
            [relabelled if f.sender == shares[0].sender else f for f in fresh], encoded[site]
        )
    # Relabelled for the new session too, it still does not open: new keys, new context.
    relabelled = shares[0].model_copy(update={"round": 2, "session": setup2.session})
    replayed = [relabelled if f.sender == shares[0].sender else f for f in fresh]
    with pytest.raises(SecAggError, match="authentication"):
        later[site].masked_input(replayed, encoded[site])
    # The honest shares still work.
    assert later[site].masked_input(fresh, encoded[site]).shape == encoded[site].shape


def test_substituted_or_forged_keys_are_refused():
    setup = setup_for(3, 4)
    ids = identities()
    clients = {
        s: SecAggClient(setup, s, ids.signers[s], ids.signers[s].certificate_pem, ids.verifier)
        for s in setup.sites
    }
    adverts = {s: c.advertise() for s, c in clients.items()}
    victim, peer, third = setup.sites
    # The coordinator swaps in its own mask key under the site's signature.
    swapped = adverts[peer].model_copy(update={"mask_key": bytes(32)})
    with pytest.raises(SecAggError, match="bad signature"):
        SecAggServer(setup, ids.verifier).receive_advertisement(swapped)
    # Relayed anyway, the victim leaves that peer out and shares nothing with it.
    bundle = clients[victim].share_keys([swapped, adverts[third]])
    assert [s.recipient for s in bundle.shares] == [third]
    assert "bad signature" in clients[victim].dropped[peer]
    # A key pair and certificate from a CA that is not the consortium's.
    rogue_ca = pki.make_ca("rogue")
    rogue = pki.issue_client_cert(rogue_ca, "rogue", peer)
    forger = EcdsaSigner(rogue.key, rogue.cert)
    forged = swapped.model_copy(update={"certificate": forger.certificate_pem})
    forged = forged.model_copy(update={"signature": forger.sign(forged.signed_bytes())})
    with pytest.raises(SecAggError, match="not issued by the CA"):
        IdentityVerifier(ids.verifier.ca).verify(
            peer, forged.certificate, forged.signed_bytes(), forged.signature
        )
    # A genuine consortium certificate of another site, used to sign for this one.
    impostor = ids.signers[third]
    posing = swapped.model_copy(update={"certificate": impostor.certificate_pem})
    posing = posing.model_copy(update={"signature": impostor.sign(posing.signed_bytes())})
    with pytest.raises(SecAggError, match="names another site"):
        IdentityVerifier(ids.verifier.ca).verify(
            peer, posing.certificate, posing.signed_bytes(), posing.signature
        )


@pytest.mark.parametrize("key", ["encryption_key", "mask_key"])
def test_a_peer_that_signs_a_low_order_key_is_left_out_by_each_honest_site(key: str) -> None:
    """A colluding peer signs a low-order point as its own key (every agreement with it is
    the all-zero secret); the coordinator relays it anyway. The honest site agrees with
    each peer once, when it checks the advertisement: that agreement refuses the key, and
    the site shares nothing with the peer and masks nothing against it."""
    setup = setup_for(4, 4, fraction=0.5)
    ids = identities()
    clients = {
        s: SecAggClient(setup, s, ids.signers[s], ids.signers[s].certificate_pem, ids.verifier)
        for s in setup.sites
    }
    adverts = {s: c.advertise() for s, c in clients.items()}
    victim, bad, *others = setup.sites
    low = adverts[bad].model_copy(update={key: bytes(32)})
    adverts[bad] = low.model_copy(update={"signature": ids.signers[bad].sign(low.signed_bytes())})
    bundle = clients[victim].share_keys([adverts[s] for s in setup.sites if s != victim])
    assert sorted(s.recipient for s in bundle.shares) == sorted(others)
    assert "not a usable key" in clients[victim].dropped[bad]
    assert key.split("_")[0] in clients[victim].dropped[bad]


def test_below_threshold_round_fails_and_reveals_nothing():
    setup, server, clients, encoded = _through_masking(n=5)
    assert setup.threshold == 3
    first, second = setup.sites[:2]
    for s in (first, second):
        server.receive_masked(s, clients[s].masked_input(server.shares_for(s), encoded[s]))
    with pytest.raises(SecAggFailedError, match="only 2 site"):
        server.close_masking()
    assert server.stage is ServerStage.FAILED
    with pytest.raises(SecAggError):
        server.finish()
    # A survivor asked anyway refuses to sign, so it never reveals a share.
    request = _request(setup, (first, second), setup.sites[2:])
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        clients[first].confirm(request)


def test_masked_input_hides_the_input():
    setup, server, clients, encoded = _through_masking()
    site = setup.sites[0]
    masked = clients[site].masked_input(server.shares_for(site), encoded[site])
    # About half of all bits differ from the input, as for a uniformly random mask.
    flipped = np.unpackbits((masked ^ encoded[site]).view(np.uint8)).mean()
    assert 0.3 < flipped < 0.7


def test_largest_values_from_every_site_do_not_wrap():
    n, d = 8, 5
    plan = plan_quantization(32, 2.5, n)
    extreme = np.zeros(d, dtype=np.float32)
    extreme[0] = 2.5
    rng = np.random.default_rng(0)
    for sign in (1, -1):
        total = sum(encode(sign * extreme, 1.0, plan, rng).astype(np.uint64) for _ in range(n))
        got, wsum = decode_sum((total % 2**32).astype(np.uint32), plan)
        assert got[0] == pytest.approx(sign * n * 2.5, abs=plan.error_bound(n))
        assert wsum == pytest.approx(n)
    assert plan.worst_case_sum() <= 2**31 - 1


def test_overflowing_configurations_are_refused():
    from fedcare.fixed_point import QuantizationError

    with pytest.raises(QuantizationError, match="could reach"):
        plan_quantization(32, 1.0, 100, fraction_bits=30)
    with pytest.raises(QuantizationError, match="steps per site"):
        plan_quantization(32, 1.0, 10_000_000)
    assert plan_quantization(64, 1.0, 10_000_000).scale >= 2**30
    ok = plan_quantization(32, 4.0, 100)
    assert ok.worst_case_sum() <= 2**31 - 1
    assert math.log2(ok.scale).is_integer()


def test_sixty_four_bit_ring_sums_exactly_within_the_bound():
    n, d = 4, 30
    plan = plan_quantization(64, 3.0, n)
    setup = round_setup(
        STUDY,
        1,
        SITES[:n],
        task_sha256=TASK,
        degree=None,
        threshold_fraction=0.6,
        seed=1,
        bits=64,
        length=d + 1,
    )
    rng = np.random.default_rng(9)
    deltas = {s: rng.normal(size=d).astype(np.float32) for s in SITES[:n]}
    weights = {s: float(rng.uniform(0.01, 1)) for s in SITES[:n]}
    encoded = {s: encode(deltas[s], weights[s], plan, rng) for s in SITES[:n]}
    assert encoded[SITES[0]].dtype == np.uint64
    total, survivors = run_local_round(setup, encoded, identities(), {SITES[1]: Stage.MASKED})
    got, wsum = decode_sum(total, plan)
    want, want_w = _expected(plan, deltas, weights, survivors)
    assert np.max(np.abs(got - want)) <= plan.error_bound(len(survivors)) + 1e-12
    assert wsum == pytest.approx(want_w, abs=1e-12)


def test_scales_beyond_exact_floats_are_refused():
    from fedcare.fixed_point import QuantizationError

    with pytest.raises(QuantizationError, match="2\\^52"):
        plan_quantization(64, 1.0, 4, fraction_bits=55)


def test_unmask_replies_carry_only_well_formed_shares():
    from pydantic import ValidationError

    from fedcare.privacy.secagg.messages import UnmaskReply

    fields = {"study_hash": STUDY, "round": 1, "session": TASK, "site": "site0", "key_shares": {}}
    assert UnmaskReply(**fields, seed_shares={"site1": "ab" * 33}).seed_shares
    for bad in ({"site1": "not hex"}, {"site1": "a" * 67}, {"../x": "ab"}):
        with pytest.raises(ValidationError):
            UnmaskReply(**fields, seed_shares=bad)


class _Unchecked(IdentityVerifier):
    """A coordinator that skips its check of key advertisements and relays them all."""

    def verify(self, *args: object, **kwargs: object) -> None:
        del args, kwargs


@pytest.mark.parametrize("drop_after", [None, "masked"])
def test_an_honest_site_drops_a_bad_peer_not_the_round(drop_after: str | None) -> None:
    """Issue 21, point 1: a forged advertisement reaches every site anyway. Each honest
    site leaves that peer out; the round sums exactly the others (with or without an
    honest dropout after sharing, which needs the pairwise masks to be rebuilt)."""
    n, d = 5, 6
    plan, deltas, weights, encoded = _inputs(n, d, 3)
    setup = setup_for(n, d)
    ids = identities()
    server = SecAggServer(setup, _Unchecked(ids.verifier.ca))
    clients = {s: client_for(setup, s, ids) for s in setup.sites}
    bad = setup.sites[-1]
    for s, c in clients.items():
        adv = c.advertise()
        if s == bad:
            adv = adv.model_copy(update={"signature": b"\x00" * 8})
        server.receive_advertisement(adv)
    server.close_advertising()
    for s, c in clients.items():
        server.receive_shares(c.share_keys(server.advertisements_for(s)))
    server.close_sharing()
    honest = [s for s in setup.sites if s != bad]
    assert all("bad signature" in clients[s].dropped[bad] for s in honest)
    assert server.shares_for(bad) == ()  # nobody is paired with it
    with pytest.raises(SecAggError, match="sent shares"):
        clients[bad].masked_input(server.shares_for(bad), encoded[bad])
    gone = honest[0] if drop_after == "masked" else None
    survivors = [s for s in honest if s != gone]
    for s in survivors:
        server.receive_masked(s, clients[s].masked_input(server.shares_for(s), encoded[s]))
    request = server.close_masking()
    assert set(request.survivors) == set(survivors)
    for s in survivors:
        server.receive_confirmation(clients[s].confirm(request))
    server.close_confirming()
    for s in survivors:
        server.receive_unmask(clients[s].unmask(server.signatures_for(s)))
    got, wsum = decode_sum(server.finish(), plan)
    want, want_w = _expected(plan, deltas, weights, survivors)
    assert np.max(np.abs(got - want)) <= plan.error_bound(len(survivors)) + 1e-9
    assert wsum == pytest.approx(want_w, abs=1e-12)


def test_the_coordinator_refuses_bad_advertisements_before_relaying() -> None:
    """Issue 21, point 1: garbage certificate, empty signature, another site's certificate,
    another round's session, a low-order key: each refused by name, none relayed."""
    setup = setup_for(4, 3)
    ids = identities()
    server = SecAggServer(setup, ids.verifier)
    clients = {s: client_for(setup, s, ids) for s in setup.sites}
    good = {s: c.advertise() for s, c in clients.items()}
    site = setup.sites[0]
    other = ids.signers[setup.sites[1]]

    def signed(adv, signer=ids.signers[site]):
        return adv.model_copy(update={"signature": signer.sign(adv.signed_bytes())})

    attacks = {
        "not issued by the CA": good[site].model_copy(
            update={"certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"}
        ),
        "bad signature": good[site].model_copy(update={"signature": b""}),
        "names another site": signed(
            good[site].model_copy(update={"certificate": other.certificate_pem}), other
        ),
        "another secure session": signed(good[site].model_copy(update={"session": "ef" * 32})),
        "not a usable key": signed(good[site].model_copy(update={"mask_key": bytes(32)})),
    }
    for reason, adv in attacks.items():
        with pytest.raises(SecAggError, match=reason):
            server.receive_advertisement(adv)
    assert server.advertised == ()
    assert site in server.refused
    for s in setup.sites[1:]:
        server.receive_advertisement(good[s])
    server.close_advertising()  # three good sites meet the threshold of 3
    assert all(a.site != site for s in setup.sites[1:] for a in server.advertisements_for(s))
