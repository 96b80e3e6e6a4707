"""Attacks by an active coordinator on SecAgg+, each of which every honest site must defeat.

The coordinator here is the adversary: it runs the honest server code where that
helps it, then sends each site whatever it likes. A site's only defence is its
own checks; each test asserts that what the coordinator collects is not enough
to remove one site's masks.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np
import pytest

from fedcare.fixed_point import plan_quantization
from fedcare.privacy.secagg.aggregator import SecAggServer
from fedcare.privacy.secagg.client import SecAggClient
from fedcare.privacy.secagg.inmemory import Identities, client_for, make_identities
from fedcare.privacy.secagg.keys import SecAggError
from fedcare.privacy.secagg.messages import (
    SurvivorSignature,
    SurvivorSignatures,
    UnmaskReply,
    UnmaskRequest,
)
from fedcare.privacy.secagg.quantize import encode
from fedcare.privacy.secagg.session import RoundSetup, round_setup

STUDY = "ab" * 32
TASK = "cd" * 32
SITES = tuple(f"site{i}" for i in range(5))
D = 8


@lru_cache(maxsize=1)
def identities() -> Identities:
    return make_identities(SITES)


def _setup(sites=SITES, degree: int | None = None, task: str = TASK) -> RoundSetup:
    return round_setup(
        STUDY,
        1,
        sites,
        task_sha256=task,
        degree=degree,
        threshold_fraction=0.6,
        seed=11,
        bits=32,
        length=D + 1,
    )


def _masked_round(
    setup: RoundSetup, ids: Identities | None = None
) -> tuple[SecAggServer, dict[str, SecAggClient]]:
    """Advertise, share and mask honestly: every site has submitted its masked input."""
    plan = plan_quantization(32, 1.0, len(setup.sites))
    rng = np.random.default_rng(0)
    ids = ids or identities()
    server = SecAggServer(setup, ids.verifier)
    clients = {s: client_for(setup, s, ids) for s in setup.sites}
    for c in clients.values():
        server.receive_advertisement(c.advertise())
    server.close_advertising()
    for s, c in clients.items():
        server.receive_shares(c.share_keys(server.advertisements_for(s)))
    server.close_sharing()
    for s, c in clients.items():
        x = encode(rng.normal(size=D).astype(np.float32) * 0.1, 0.5, plan, rng)
        server.receive_masked(s, c.masked_input(server.shares_for(s), x))
    return server, clients


def _request(setup: RoundSetup, survivors, dropped) -> UnmaskRequest:
    return UnmaskRequest(
        study_hash=STUDY,
        round=1,
        session=setup.session,
        survivors=tuple(survivors),
        dropped=tuple(dropped),
    )


def _try_unmask(setup, clients, requests) -> tuple[dict[str, UnmaskReply], dict[str, str]]:
    """Show each site its own request; relay every signature the adversary gathered (on any
    request) to every site; collect what each site reveals and why each refused."""
    signatures: dict[str, SurvivorSignature] = {}
    refused: dict[str, str] = {}
    for site, request in requests.items():
        try:
            signatures[site] = clients[site].confirm(request)
        except SecAggError as exc:
            refused[site] = str(exc)
    revealed: dict[str, UnmaskReply] = {}
    for site, signature in signatures.items():
        del signature
        # The adversary's best relay: every signature from the site's neighbours.
        relay = [signatures[p] for p in setup.neighbours[site] if p in signatures]
        proof = SurvivorSignatures(
            study_hash=STUDY,
            round=1,
            session=setup.session,
            request=requests[site],
            signatures=tuple(relay),
        )
        try:
            revealed[site] = clients[site].unmask(proof)
        except SecAggError as exc:
            refused[site] = str(exc)
    return revealed, refused


def _shares_of(revealed: dict[str, UnmaskReply], owner: str, kind: str) -> int:
    table = "seed_shares" if kind == "seed" else "key_shares"
    return sum(owner in getattr(r, table) for r in revealed.values())


def _isolates(setup: RoundSetup, revealed: dict[str, UnmaskReply], target: str) -> bool:
    """True if the shares revealed remove every mask on ``target``'s input alone: its
    self-mask seed, and for each neighbour either that neighbour's mask key or the target's."""
    t = setup.threshold
    if _shares_of(revealed, target, "seed") < t:
        return False
    if _shares_of(revealed, target, "key") >= t:
        return True
    return all(_shares_of(revealed, v, "key") >= t for v in setup.neighbours[target])


@pytest.mark.parametrize("degree", [None, 2])
def test_a_different_request_per_site_isolates_no_one(degree):
    """Issue 12, point 1: each site is told it and the target survived, and everyone else
    dropped, padded with names of no real site to pass a count of survivors."""
    setup = _setup(degree=degree)
    target = SITES[0]
    _, clients = _masked_round(setup)
    ghosts = [f"ghost{i}" for i in range(setup.threshold)]
    requests = {
        s: _request(setup, sorted({s, target, *ghosts}), [o for o in SITES if o not in {s, target}])
        for s in SITES
    }
    revealed, refused = _try_unmask(setup, clients, requests)
    assert not revealed
    assert set(refused) == set(SITES)
    assert all("not in this session" in why for why in refused.values())


@pytest.mark.parametrize("degree", [None, 2])
def test_no_assignment_of_requests_isolates_a_site(degree):
    """The same attack with real names only, over every way of showing each site one of
    the plausible requests: no assignment lets the coordinator unmask one site alone."""
    setup = _setup(degree=degree)
    target = SITES[0]
    _, clients_template = _masked_round(setup)
    del clients_template
    # Plausible requests: survivors contain the target, the rest are dropped.
    others = [s for s in SITES if s != target]
    candidates = [
        frozenset({target, *extra})
        for k in range(len(others) + 1)
        for extra in itertools.combinations(others, k)
    ]
    rng = np.random.default_rng(3)
    for _ in range(12):
        _, clients = _masked_round(setup)
        choice = {s: candidates[int(rng.integers(len(candidates)))] | {s} for s in SITES}
        requests = {
            s: _request(setup, sorted(choice[s]), [o for o in SITES if o not in choice[s]])
            for s in SITES
        }
        revealed, _ = _try_unmask(setup, clients, requests)
        assert not _isolates(setup, revealed, target), choice
        # Whatever was revealed is for one request only: one survivor set at most.
        shown = {requests[s] for s in revealed}
        assert len(shown) <= 1


def test_a_consistent_request_still_unmasks():
    """The checks do not stop the honest case: one request, every survivor's signature."""
    setup = _setup()
    _, clients = _masked_round(setup)
    request = _request(setup, SITES[:4], SITES[4:])
    requests = dict.fromkeys(SITES[:4], request)
    revealed, refused = _try_unmask(setup, clients, requests)
    assert set(revealed) == set(SITES[:4])
    assert not refused


def test_signatures_on_another_request_or_forged_do_not_count():
    setup = _setup()
    _, clients = _masked_round(setup)
    mine = _request(setup, SITES, ())
    theirs = _request(setup, SITES[:4], SITES[4:])
    signed_mine = clients[SITES[0]].confirm(mine)
    del signed_mine
    on_theirs = [clients[s].confirm(theirs) for s in SITES[1:4]]
    proof = SurvivorSignatures(
        study_hash=STUDY, round=1, session=setup.session, request=mine, signatures=tuple(on_theirs)
    )
    with pytest.raises(SecAggError, match="bad signature"):
        clients[SITES[0]].unmask(proof)
    # Relaying the other request instead is refused outright.
    proof = proof.model_copy(update={"request": theirs})
    with pytest.raises(SecAggError, match="another unmasking request"):
        clients[SITES[0]].unmask(proof)


def test_too_few_signatures_reveal_nothing():
    setup = _setup()
    _, clients = _masked_round(setup)
    request = _request(setup, SITES, ())
    for s in SITES:
        clients[s].confirm(request)
    proof = SurvivorSignatures(
        study_hash=STUDY, round=1, session=setup.session, request=request, signatures=()
    )
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        clients[SITES[0]].unmask(proof)


def test_sites_shown_different_participants_refuse_each_other():
    """The participant list comes from the coordinator; a site shown another list (or
    another task) is in another session, and its neighbours refuse its keys."""
    full = _setup()
    fewer = _setup(sites=SITES[:4])
    retasked = _setup(task="ef" * 32)
    assert len({full.session, fewer.session, retasked.session}) == 3
    victim = client_for(full, SITES[0], identities())
    victim.advertise()
    for other in (fewer, retasked):
        adverts = [client_for(other, s, identities()).advertise() for s in other.sites[1:]]
        with pytest.raises(SecAggError, match="another secure session"):
            victim.share_keys(adverts)


def _split_attack(n_sites: int, colluders: int) -> bool:
    """The best attack on the consistency check with ``colluders`` colluding sites, over the
    complete graph: the coordinator shows half the honest sites "everyone survived" and the
    other half "the target dropped", colluders sign both and hand over every share they
    hold. True if it rebuilds both the target's self-mask seed and its mask key, which
    removes every mask on the target's input alone."""
    sites = tuple(f"site{i}" for i in range(n_sites))
    setup = _setup(sites=sites)
    ids = make_identities(sites)
    _, clients = _masked_round(setup, ids)
    target, bad = sites[0], set(sites[-colluders:]) if colluders else set()
    honest = [s for s in sites if s not in bad]
    everyone = _request(setup, sites, ())
    target_gone = _request(setup, [s for s in sites if s != target], [target])
    half = (len(honest) + 1) // 2
    shown = {s: everyone if i < half else target_gone for i, s in enumerate(honest)}
    signatures: dict[UnmaskRequest, dict[str, SurvivorSignature]] = {
        everyone: {},
        target_gone: {},
    }
    for s in honest:
        signatures[shown[s]][s] = clients[s].confirm(shown[s])
    for s in bad:
        for request in signatures:
            signatures[request][s] = SurvivorSignature(
                study_hash=STUDY,
                round=1,
                session=setup.session,
                site=s,
                signature=ids.signers[s].sign(request.signed_bytes()),
            )
    seed_holders = key_holders = len(bad)  # colluders hand over both shares of the target
    for s in honest:
        relay = [v for k, v in signatures[shown[s]].items() if k != s]
        proof = SurvivorSignatures(
            study_hash=STUDY,
            round=1,
            session=setup.session,
            request=shown[s],
            signatures=tuple(relay),
        )
        try:
            reply = clients[s].unmask(proof)
        except SecAggError:
            continue
        seed_holders += target in reply.seed_shares
        key_holders += target in reply.key_shares
    return seed_holders >= setup.threshold and key_holders >= setup.threshold


@pytest.mark.parametrize("n_sites", [5, 10, 12])
def test_the_collusion_bound_is_exact(n_sites):
    """docs/secure_aggregation.md states how many colluding sites the guarantee survives;
    with that many the best split attack fails, with one more it succeeds."""
    from fedcare.privacy.secagg.graph import colluders_tolerated

    setup = _setup(sites=tuple(f"site{i}" for i in range(n_sites)))
    bound = colluders_tolerated(n_sites, setup.threshold)
    assert not _split_attack(n_sites, bound)
    assert _split_attack(n_sites, bound + 1)


def test_the_relay_refuses_a_bad_survivor_signature_instead_of_relaying_it():
    """One member posting garbage in the consistency stage must not make its honest
    neighbours refuse the session: the coordinator checks it against the site's own
    advertised certificate and answers with the reason."""
    setup = _setup()
    server, clients = _masked_round(setup)
    request = server.close_masking()
    good = clients[SITES[1]].confirm(request)
    forged = good.model_copy(update={"site": SITES[0], "signature": b"\x30" * 70})
    with pytest.raises(SecAggError, match="does not verify"):
        server.receive_confirmation(forged)
    server.receive_confirmation(good)
    assert server.confirmed == (SITES[1],)
