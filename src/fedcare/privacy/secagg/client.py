"""A site's side of a SecAgg+ round: a state machine that refuses what an honest site must.

advertise -> share_keys -> masked_input -> unmask. The site's input only ever
leaves masked by its own self-mask and its pairwise masks; the site reveals,
per peer, either a share of that peer's self-mask seed (the peer submitted) or
a share of its mask key (the peer dropped), never both, and never the key of a
site the coordinator itself lists as having submitted, nor its own.
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
    agree,
    new_exchange_key,
    private_bytes,
    public_bytes,
)
from fedcare.privacy.secagg.messages import (
    EncryptedShare,
    KeyAdvertisement,
    ShareBundle,
    UnmaskReply,
    UnmaskRequest,
)
from fedcare.privacy.secagg.prg import add_mask, dtype_for
from fedcare.privacy.secagg.session import RoundSetup, open_sealed, seal


class ClientStage(StrEnum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    SUBMITTED = "submitted"


class SecAggClient:
    """One site in one round."""

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
        self._held: dict[str, tuple[int, int]] = {}
        self._own = (0, 0)
        self._revealed_seed: set[str] = set()
        self._revealed_key: set[str] = set()

    def _expect(self, stage: ClientStage, action: str) -> None:
        if self.stage is not stage:
            raise SecAggError(f"site '{self.site}' cannot {action} now (stage {self.stage})")

    def _check_round(self, study_hash: str, number: int, what: str) -> None:
        if study_hash != self.setup.study_hash or number != self.setup.round:
            raise SecAggError(f"{what} is for another study or round")

    def advertise(self) -> KeyAdvertisement:
        """This round's two public keys, signed with the site's identity key."""
        self._expect(ClientStage.NEW, "advertise keys")
        unsigned = KeyAdvertisement(
            study_hash=self.setup.study_hash,
            round=self.setup.round,
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
        for adv in advertisements:
            self._check_round(adv.study_hash, adv.round, f"the key advertisement of '{adv.site}'")
            if adv.site not in neighbours:
                raise SecAggError(f"'{adv.site}' is not a neighbour of '{self.site}'")
            if adv.site in peers:
                raise SecAggError(f"two key advertisements for '{adv.site}'")
            self.verifier.verify(adv.site, adv.certificate, adv.signed_bytes(), adv.signature)
            peers[adv.site] = adv
        if len(peers) + 1 < self.setup.threshold:
            raise SecAggError(
                f"only {len(peers)} neighbour(s) of '{self.site}' advertised keys; "
                f"the threshold is {self.setup.threshold}"
            )
        self._peers = peers
        # The site keeps one share of each secret itself, as in Bonawitz et al.
        order = sorted(peers)
        xs = [self.setup.index(p) for p in [*order, self.site]]
        seed_shares = shamir.split(self._seed, xs, self.setup.threshold)
        key_shares = shamir.split(private_bytes(self._mask), xs, self.setup.threshold)
        own = self.setup.index(self.site)
        self._own = (seed_shares[own], key_shares[own])
        label = self.setup.label("share")
        sealed = []
        for peer in order:
            x = self.setup.index(peer)
            key = agree(self._encryption, peers[peer].encryption_key, label)
            context = self.setup.share_context(self.site, peer)
            sealed.append(
                EncryptedShare(
                    study_hash=self.setup.study_hash,
                    round=self.setup.round,
                    sender=self.site,
                    recipient=peer,
                    ciphertext=seal(key, context, seed_shares[x], key_shares[x]),
                )
            )
        self.stage = ClientStage.SHARED
        return ShareBundle(
            study_hash=self.setup.study_hash,
            round=self.setup.round,
            sender=self.site,
            shares=tuple(sealed),
        )

    def masked_input(
        self, shares: Sequence[EncryptedShare], encoded: NDArray[np.unsignedinteger]
    ) -> NDArray[np.unsignedinteger]:
        """Open the shares addressed to this site; return ``encoded`` under all its masks."""
        self._expect(ClientStage.SHARED, "submit a masked input")
        dtype = dtype_for(self.setup.bits)
        if encoded.dtype != dtype or encoded.shape != (self.setup.length,):
            raise SecAggError(f"the input must be {self.setup.length} values of {dtype.__name__}")
        label = self.setup.label("share")
        held: dict[str, tuple[int, int]] = {self.site: self._own}
        for share in shares:
            self._check_round(share.study_hash, share.round, f"a share from '{share.sender}'")
            if share.recipient != self.site:
                raise SecAggError(f"a share for '{share.recipient}' was sent to '{self.site}'")
            if share.sender in held or share.sender == self.site:
                raise SecAggError(f"a second share from '{share.sender}' (replayed?)")
            peer = self._peers.get(share.sender)
            if peer is None:
                raise SecAggError(f"a share from '{share.sender}', who advertised no keys")
            key = agree(self._encryption, peer.encryption_key, label)
            context = self.setup.share_context(share.sender, self.site)
            held[share.sender] = open_sealed(key, context, share.ciphertext)
        if len(held) < self.setup.threshold:
            raise SecAggError(
                f"only {len(held) - 1} neighbour(s) of '{self.site}' sent shares; "
                f"the threshold is {self.setup.threshold}"
            )
        self._held = held
        masked = encoded.copy()
        add_mask(masked, self._seed, self.setup.bits)
        mask_label = self.setup.label("mask")
        for other in sorted(set(held) - {self.site}):
            pairwise = agree(self._mask, self._peers[other].mask_key, mask_label)
            add_mask(masked, pairwise, self.setup.bits, 1 if self.site < other else -1)
        self.stage = ClientStage.SUBMITTED
        return masked

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Reveal one kind of share per peer, refusing any request an honest site must refuse."""
        self._expect(ClientStage.SUBMITTED, "reveal shares")
        self._check_round(request.study_hash, request.round, "the unmasking request")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            both = ", ".join(sorted(survivors & dropped))
            raise SecAggError(f"refused: {both} listed both as submitted and as dropped")
        if self.site in dropped or self.site not in survivors:
            raise SecAggError(f"refused: '{self.site}' submitted and will not be unmasked")
        if len(survivors) < self.setup.threshold:
            raise SecAggError(
                f"refused: {len(survivors)} site(s) submitted, fewer than the threshold "
                f"{self.setup.threshold}"
            )
        seed_for = sorted(p for p in self._held if p in survivors)
        key_for = sorted(p for p in self._held if p in dropped)
        if conflict := (set(seed_for) & self._revealed_key) | (set(key_for) & self._revealed_seed):
            raise SecAggError(
                "refused: would reveal both kinds of share for " + ", ".join(sorted(conflict))
            )
        self._revealed_seed.update(seed_for)
        self._revealed_key.update(key_for)
        return UnmaskReply(
            study_hash=self.setup.study_hash,
            round=self.setup.round,
            site=self.site,
            seed_shares={p: format(self._held[p][0], "x") for p in seed_for},
            key_shares={p: format(self._held[p][1], "x") for p in key_for},
        )
