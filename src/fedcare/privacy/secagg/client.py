"""A site's side of a SecAgg+ session: a state machine that refuses what an honest site must.

advertise -> share_keys -> masked_input -> confirm -> unmask. The site's input
only ever leaves masked by its own self-mask and its pairwise masks. Before it
reveals any share it runs the consistency check of Bonawitz et al. (2017, §4)
within its neighbourhood (Bell et al. 2020): it signs the one unmasking request
it was shown, after checking it against what it saw itself, and it reveals
nothing until it holds signatures on that same request from at least the
threshold of its neighbourhood (itself included). Each honest site signs once
per session, and the threshold is above half of every neighbourhood, so two
different requests can never both gather enough signatures: the coordinator
cannot show some sites a peer as submitted and others the same peer as dropped.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

from fedcare.privacy.secagg import shamir
from fedcare.privacy.secagg.keys import (
    IdentitySigner,
    IdentityVerifier,
    SecAggError,
    agree_checked,
    new_exchange_key,
    private_bytes,
    public_bytes,
)
from fedcare.privacy.secagg.messages import (
    EncryptedShare,
    KeyAdvertisement,
    SecAggMessage,
    ShareBundle,
    SurvivorSignature,
    SurvivorSignatures,
    UnmaskReply,
    UnmaskRequest,
)
from fedcare.privacy.secagg.prg import add_masks, dtype_for
from fedcare.privacy.secagg.session import RoundSetup, open_sealed, seal


class ClientStage(StrEnum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    SUBMITTED = "submitted"
    CONFIRMED = "confirmed"
    REVEALED = "revealed"


class SecAggClient:
    """One site in one secure session."""

    def __init__(
        self,
        setup: RoundSetup,
        site: str,
        signer: IdentitySigner,
        certificate_pem: str,
        verifier: IdentityVerifier,
    ) -> None:
        if site not in setup.sites:
            raise SecAggError(f"site '{site}' is not part of round {setup.round}")
        self.setup = setup
        self.site = site
        self.signer = signer
        self.certificate_pem = certificate_pem
        self.verifier = verifier
        self.stage = ClientStage.NEW
        self._encryption = new_exchange_key()
        self._mask = new_exchange_key()
        self._seed = secrets.token_bytes(32)
        self._peers: dict[str, KeyAdvertisement] = {}
        self._share_keys: dict[str, bytes] = {}
        self._mask_seeds: dict[str, bytes] = {}
        """Per peer, the agreed key its shares are sealed with and the seed of its pairwise
        mask: each agreed once, when its advertisement is checked."""
        self._held: dict[str, tuple[int, int]] = {}
        self._own = (0, 0)
        self._request: UnmaskRequest | None = None
        self.dropped: dict[str, str] = {}
        """Neighbours left out of this session, with why: their key advertisement did not
        check out against the consortium CA."""

    def _expect(self, stage: ClientStage, action: str) -> None:
        if self.stage is not stage:
            raise SecAggError(f"site '{self.site}' cannot {action} now (stage {self.stage})")

    def _check_session(self, message: SecAggMessage, what: str) -> None:
        setup = self.setup
        if (message.study_hash, message.round) != (setup.study_hash, setup.round):
            raise SecAggError(f"{what} is for another study or round")
        if message.session != setup.session:
            raise SecAggError(
                f"{what} is for another secure session (other participants, graph, threshold "
                "or task than this site was shown)"
            )

    def _header(self) -> dict[str, object]:
        s = self.setup
        return {"study_hash": s.study_hash, "round": s.round, "session": s.session}

    def advertise(self) -> KeyAdvertisement:
        """This session's two public keys, signed with the site's identity key."""
        self._expect(ClientStage.NEW, "advertise keys")
        unsigned = KeyAdvertisement(
            **self._header(),
            site=self.site,
            encryption_key=public_bytes(self._encryption),
            mask_key=public_bytes(self._mask),
            certificate=self.certificate_pem,
            signature=b"",
        )
        self.stage = ClientStage.ADVERTISED
        signature = self.signer.sign(unsigned.signed_bytes())
        return unsigned.model_copy(update={"signature": signature})

    def share_keys(self, advertisements: Sequence[KeyAdvertisement]) -> ShareBundle:
        """Check the neighbours' signed keys; seal shares of the seed and mask key for each."""
        self._expect(ClientStage.ADVERTISED, "share keys")
        neighbours = set(self.setup.neighbours[self.site])
        peers: dict[str, KeyAdvertisement] = {}
        share_keys: dict[str, bytes] = {}
        mask_seeds: dict[str, bytes] = {}
        label, mask_label = self.setup.label("share"), self.setup.label("mask")
        seen: set[str] = set()
        for adv in advertisements:
            self._check_session(adv, f"the key advertisement of '{adv.site}'")
            if adv.site not in neighbours:
                raise SecAggError(f"'{adv.site}' is not a neighbour of '{self.site}'")
            if adv.site in seen:
                raise SecAggError(f"two key advertisements for '{adv.site}'")
            seen.add(adv.site)
            try:
                self.verifier.verify(adv.site, adv.certificate, adv.signed_bytes(), adv.signature)
                # Agreeing is the check: a low-order key fails it, as check_exchange_key.
                share_keys[adv.site] = agree_checked(
                    self._encryption, adv.site, adv.encryption_key, "encryption key", label
                )
                mask_seeds[adv.site] = agree_checked(
                    self._mask, adv.site, adv.mask_key, "mask key", mask_label
                )
            except SecAggError as exc:
                # One bad peer costs its own place, not the round: this site shares
                # nothing with it and masks nothing against it, and the coordinator
                # pairs only sites that sent each other shares.
                self.dropped[adv.site] = str(exc)
                continue
            peers[adv.site] = adv
        if len(peers) + 1 < self.setup.threshold:
            raise SecAggError(
                f"only {len(peers)} neighbour(s) of '{self.site}' advertised keys; "
                f"the threshold is {self.setup.threshold}"
            )
        self._peers = peers
        self._share_keys = {p: share_keys[p] for p in peers}
        self._mask_seeds = {p: mask_seeds[p] for p in peers}
        # The site keeps one share of each secret itself, as in Bonawitz et al.
        order = sorted(peers)
        xs = [self.setup.index(p) for p in [*order, self.site]]
        seed_shares = shamir.split(self._seed, xs, self.setup.threshold)
        key_shares = shamir.split(private_bytes(self._mask), xs, self.setup.threshold)
        own = self.setup.index(self.site)
        self._own = (seed_shares[own], key_shares[own])
        sealed = []
        for peer in order:
            x = self.setup.index(peer)
            key = self._share_keys[peer]
            context = self.setup.share_context(self.site, peer)
            sealed.append(
                EncryptedShare(
                    **self._header(),
                    sender=self.site,
                    recipient=peer,
                    ciphertext=seal(key, context, seed_shares[x], key_shares[x]),
                )
            )
        self.stage = ClientStage.SHARED
        return ShareBundle(**self._header(), sender=self.site, shares=tuple(sealed))

    def masked_input(
        self, shares: Sequence[EncryptedShare], encoded: NDArray[np.unsignedinteger]
    ) -> NDArray[np.unsignedinteger]:
        """Open the shares addressed to this site; return ``encoded`` under all its masks."""
        self._expect(ClientStage.SHARED, "submit a masked input")
        dtype = dtype_for(self.setup.bits)
        if encoded.dtype != dtype or encoded.shape != (self.setup.length,):
            raise SecAggError(f"the input must be {self.setup.length} values of {dtype.__name__}")
        held: dict[str, tuple[int, int]] = {self.site: self._own}
        for share in shares:
            self._check_session(share, f"a share from '{share.sender}'")
            if share.recipient != self.site:
                raise SecAggError(f"a share for '{share.recipient}' was sent to '{self.site}'")
            if share.sender in held or share.sender == self.site:
                raise SecAggError(f"a second share from '{share.sender}' (replayed?)")
            key = self._share_keys.get(share.sender)
            if key is None:
                raise SecAggError(f"a share from '{share.sender}', who advertised no keys")
            context = self.setup.share_context(share.sender, self.site)
            held[share.sender] = open_sealed(key, context, share.ciphertext)
        if len(held) < self.setup.threshold:
            raise SecAggError(
                f"only {len(held) - 1} neighbour(s) of '{self.site}' sent shares; "
                f"the threshold is {self.setup.threshold}"
            )
        self._held = held
        masked = encoded.copy()
        terms = [(self._seed, 1)] + [
            (self._mask_seeds[other], 1 if self.site < other else -1)
            for other in sorted(set(held) - {self.site})
        ]
        add_masks(masked, terms, self.setup.bits)
        self.stage = ClientStage.SUBMITTED
        return masked

    def confirm(self, request: UnmaskRequest) -> SurvivorSignature:
        """Check the coordinator's survivor list against this site's own view; sign it.

        The site signs at most one request per session, and only one that is
        consistent with what it saw: every name is a participant of the session,
        survivors and dropped are disjoint, this site is a survivor, together they
        are exactly the neighbours that sent it shares, and at least the threshold
        of its neighbourhood survived.
        """
        self._expect(ClientStage.SUBMITTED, "confirm the survivors")
        self._check_session(request, "the unmasking request")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise SecAggError("refused: the unmasking request lists a site twice")
        if unknown := (survivors | dropped) - set(self.setup.sites):
            raise SecAggError(
                "refused: the unmasking request names sites that are not in this session: "
                + ", ".join(sorted(unknown))
            )
        if both := survivors & dropped:
            raise SecAggError(
                f"refused: {', '.join(sorted(both))} listed both as submitted and as dropped"
            )
        if self.site not in survivors:
            raise SecAggError(f"refused: '{self.site}' submitted and will not be unmasked")
        neighbourhood = self.setup.neighbourhood(self.site) - set(self.dropped)
        listed = (survivors | dropped) & neighbourhood
        if listed != set(self._held):
            wrong = sorted(listed ^ set(self._held))
            raise SecAggError(
                "refused: the unmasking request does not match the neighbours that sent "
                f"'{self.site}' shares (differs on {', '.join(wrong)})"
            )
        alive = len(survivors & neighbourhood)
        if alive < self.setup.threshold:
            raise SecAggError(
                f"refused: {alive} site(s) of the neighbourhood of '{self.site}' submitted, "
                f"fewer than the threshold {self.setup.threshold}"
            )
        self._request = request
        self.stage = ClientStage.CONFIRMED
        return SurvivorSignature(
            **self._header(), site=self.site, signature=self.signer.sign(request.signed_bytes())
        )

    def unmask(self, proof: SurvivorSignatures) -> UnmaskReply:
        """Reveal one kind of share per peer once the threshold of the neighbourhood has
        signed the same request this site signed; refuse anything else."""
        self._expect(ClientStage.CONFIRMED, "reveal shares")
        request = self._request
        assert request is not None
        self._check_session(proof, "the survivors' signatures")
        if proof.request != request:
            raise SecAggError(
                "refused: the coordinator relays another unmasking request than the one "
                f"'{self.site}' signed"
            )
        signed = request.signed_bytes()
        signers = {self.site}
        for item in proof.signatures:
            self._check_session(item, f"the signature of '{item.site}'")
            if item.site in signers:
                raise SecAggError(f"refused: two survivor signatures from '{item.site}'")
            if item.site in self.dropped:
                continue  # a peer this site left out counts for nothing
            peer = self._peers.get(item.site)
            if peer is None or item.site not in request.survivors:
                raise SecAggError(
                    f"refused: a survivor signature from '{item.site}', not a surviving "
                    f"neighbour of '{self.site}'"
                )
            self.verifier.verify(
                item.site, peer.certificate, signed, item.signature, "survivor signature"
            )
            signers.add(item.site)
        if len(signers) < self.setup.threshold:
            raise SecAggError(
                f"refused: {len(signers)} site(s) of the neighbourhood of '{self.site}' signed "
                f"the survivor list, fewer than the threshold {self.setup.threshold}"
            )
        survivors, dropped = set(request.survivors), set(request.dropped)
        seed_for = sorted(p for p in self._held if p in survivors)
        key_for = sorted(p for p in self._held if p in dropped)
        self.stage = ClientStage.REVEALED
        return UnmaskReply(
            **self._header(),
            site=self.site,
            seed_shares={p: format(self._held[p][0], "x") for p in seed_for},
            key_shares={p: format(self._held[p][1], "x") for p in key_for},
        )
