"""The coordinator's side of a SecAgg+ session: it relays keys and shares, sums masked
inputs as they arrive, relays the survivors' signatures on who submitted (the
consistency check), and removes the masks from the sum once survivors reveal shares.

It never holds a site's input unmasked: each masked vector is added into the
running total and dropped. When fewer than the threshold of sites are left, or
the shares cannot rebuild a mask, the round fails with the reason and the
masked total is discarded, so no partial sum is revealed.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

from fedcare.privacy.secagg import shamir
from fedcare.privacy.secagg.keys import (
    IdentityVerifier,
    SecAggError,
    agree,
    check_exchange_key,
    public_of,
    signed_by_certificate,
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
from fedcare.privacy.secagg.session import RoundSetup


class SecAggFailedError(SecAggError):
    """The round cannot produce a sum; nothing about the inputs was revealed."""


class ServerStage(StrEnum):
    ADVERTISING = "advertising"
    SHARING = "sharing"
    MASKING = "masking"
    CONFIRMING = "confirming"
    UNMASKING = "unmasking"
    DONE = "done"
    FAILED = "failed"


class SecAggServer:
    """The relay and summing point of one round.

    ``verifier`` checks each key advertisement against the consortium CA before it is
    relayed, so one site's bad advertisement is refused here, not met by every peer."""

    def __init__(self, setup: RoundSetup, verifier: IdentityVerifier) -> None:
        self.setup = setup
        self.verifier = verifier
        self.refused: dict[str, str] = {}
        """Sites whose advertisement was refused, with why (until one is accepted)."""
        self.stage = ServerStage.ADVERTISING
        self.reason = ""
        self._adverts: dict[str, KeyAdvertisement] = {}
        self._bundles: dict[str, ShareBundle] = {}
        self._delivered: dict[str, tuple[str, ...]] = {}
        self._submitted: set[str] = set()
        self._total = np.zeros(setup.length, dtype=dtype_for(setup.bits))
        self._request: UnmaskRequest | None = None
        self._signatures: dict[str, SurvivorSignature] = {}
        self._replies: dict[str, UnmaskReply] = {}

    def _expect(self, stage: ServerStage, action: str) -> None:
        if self.stage is not stage:
            raise SecAggError(f"cannot {action} in stage {self.stage} of round {self.setup.round}")

    def _check(self, message: SecAggMessage, site: str) -> None:
        setup = self.setup
        if (message.study_hash, message.round, message.session) != (
            setup.study_hash,
            setup.round,
            setup.session,
        ):
            raise SecAggError(f"a message from '{site}' is for another secure session")
        if site not in self.setup.sites:
            raise SecAggError(f"site '{site}' is not part of round {self.setup.round}")

    def fail(self, reason: str) -> SecAggFailedError:
        """Mark the round failed, forget the masked total, and return the error to raise."""
        self.stage = ServerStage.FAILED
        self.reason = reason
        self._total = np.zeros(0, dtype=self._total.dtype)
        return SecAggFailedError(reason)

    @property
    def advertised(self) -> tuple[str, ...]:
        return tuple(sorted(self._adverts))

    @property
    def shared(self) -> tuple[str, ...]:
        return tuple(sorted(self._bundles))

    @property
    def submitted(self) -> tuple[str, ...]:
        return tuple(sorted(self._submitted))

    def receive_advertisement(self, adv: KeyAdvertisement) -> None:
        self._expect(ServerStage.ADVERTISING, "take key advertisements")
        self._check(adv, adv.site)
        previous = self._adverts.get(adv.site)
        if previous is not None:
            if previous != adv:
                raise SecAggError(f"site '{adv.site}' already advertised different keys")
            return
        try:
            self.verifier.verify(adv.site, adv.certificate, adv.signed_bytes(), adv.signature)
            check_exchange_key(adv.site, adv.encryption_key, "encryption key")
            check_exchange_key(adv.site, adv.mask_key, "mask key")
        except SecAggError as exc:
            self.refused[adv.site] = str(exc)
            raise
        self.refused.pop(adv.site, None)
        self._adverts[adv.site] = adv

    def close_advertising(self) -> None:
        self._expect(ServerStage.ADVERTISING, "close advertising")
        if len(self._adverts) < self.setup.threshold:
            raise self.fail(
                f"only {len(self._adverts)} site(s) advertised keys; "
                f"the threshold is {self.setup.threshold}"
            )
        self.stage = ServerStage.SHARING

    def advertisements_for(self, site: str) -> tuple[KeyAdvertisement, ...]:
        """The signed keys of the site's neighbours, as the neighbours sent them."""
        if self.stage is ServerStage.ADVERTISING:
            raise SecAggError("key advertisements are relayed once advertising has closed")
        return tuple(self._adverts[p] for p in self.setup.neighbours[site] if p in self._adverts)

    def receive_shares(self, bundle: ShareBundle) -> None:
        self._expect(ServerStage.SHARING, "take shares")
        self._check(bundle, bundle.sender)
        if bundle.sender not in self._adverts:
            raise SecAggError(f"site '{bundle.sender}' sends shares but advertised no keys")
        allowed = set(self.setup.neighbours[bundle.sender]) & set(self._adverts)
        recipients = [s.recipient for s in bundle.shares]
        if any(s.sender != bundle.sender for s in bundle.shares) or len(set(recipients)) != len(
            recipients
        ):
            raise SecAggError(f"the share bundle of '{bundle.sender}' is malformed")
        if not set(recipients) <= allowed:
            raise SecAggError(f"'{bundle.sender}' sends shares to sites that are not its peers")
        previous = self._bundles.get(bundle.sender)
        if previous is not None and previous != bundle:
            raise SecAggError(f"site '{bundle.sender}' already sent different shares")
        self._bundles[bundle.sender] = bundle

    def close_sharing(self) -> None:
        self._expect(ServerStage.SHARING, "close sharing")
        if len(self._bundles) < self.setup.threshold:
            raise self.fail(
                f"only {len(self._bundles)} site(s) sent shares; "
                f"the threshold is {self.setup.threshold}"
            )
        # Two sites mask against each other only if each sent the other shares: a site
        # that left a bad peer out is not paired with it from the peer's side either.
        sent = {
            sender: {s.recipient for s in bundle.shares} for sender, bundle in self._bundles.items()
        }
        for site, recipients in sent.items():
            self._delivered[site] = tuple(
                sorted(other for other in recipients if site in sent.get(other, ()))
            )
        self.stage = ServerStage.MASKING

    def shares_for(self, site: str) -> tuple[EncryptedShare, ...]:
        """The sealed shares addressed to ``site``; it masks against exactly these senders."""
        self._expect(ServerStage.MASKING, "relay shares")
        if site not in self._delivered:
            raise SecAggError(f"site '{site}' sent no shares and takes no part in masking")
        return tuple(
            share
            for sender in self._delivered[site]
            for share in self._bundles[sender].shares
            if share.recipient == site
        )

    def receive_masked(self, site: str, masked: NDArray[np.unsignedinteger]) -> bool:
        """Add a masked input into the total. False for a repeat (the first one counts)."""
        self._expect(ServerStage.MASKING, "take masked inputs")
        if site not in self._delivered:
            raise SecAggError(f"site '{site}' sent no shares; its masked input cannot be unmasked")
        if masked.dtype != self._total.dtype or masked.shape != self._total.shape:
            raise SecAggError(f"the masked input of '{site}' has the wrong type or length")
        if site in self._submitted:
            return False
        np.add(self._total, masked, out=self._total)
        self._submitted.add(site)
        return True

    def close_masking(self) -> UnmaskRequest:
        """Fix who submitted and who dropped; the request every survivor answers."""
        self._expect(ServerStage.MASKING, "close masking")
        survivors = self.submitted
        if len(survivors) < self.setup.threshold:
            raise self.fail(
                f"only {len(survivors)} site(s) submitted masked inputs; "
                f"the threshold is {self.setup.threshold}, so no sum is revealed"
            )
        # A site paired with no one added no pairwise mask: there is nothing to rebuild.
        dropped = tuple(
            s for s in self.shared if s not in self._submitted and self._delivered.get(s)
        )
        self._request = UnmaskRequest(
            study_hash=self.setup.study_hash,
            round=self.setup.round,
            session=self.setup.session,
            survivors=survivors,
            dropped=dropped,
        )
        self.stage = ServerStage.CONFIRMING
        return self._request

    @property
    def request(self) -> UnmaskRequest | None:
        return self._request

    @property
    def confirmed(self) -> tuple[str, ...]:
        """Survivors whose signature on the unmasking request has arrived."""
        return tuple(sorted(self._signatures))

    def receive_confirmation(self, signature: SurvivorSignature) -> None:
        self._expect(ServerStage.CONFIRMING, "take survivor signatures")
        self._check(signature, signature.site)
        assert self._request is not None
        if signature.site not in self._request.survivors:
            raise SecAggError(f"site '{signature.site}' did not submit and cannot sign")
        # Relay only what its neighbours will accept: one bad signature would make
        # every honest neighbour refuse the whole session.
        certificate = self._adverts[signature.site].certificate
        if not signed_by_certificate(
            certificate, self._request.signed_bytes(), signature.signature
        ):
            raise SecAggError(
                f"the survivor signature of '{signature.site}' does not verify with the "
                "certificate it advertised"
            )
        previous = self._signatures.get(signature.site)
        if previous is not None and previous != signature:
            raise SecAggError(f"site '{signature.site}' already signed the survivor list")
        self._signatures[signature.site] = signature

    def close_confirming(self) -> None:
        self._expect(ServerStage.CONFIRMING, "close confirming")
        if len(self._signatures) < self.setup.threshold:
            raise self.fail(
                f"only {len(self._signatures)} site(s) signed the survivor list; "
                f"the threshold is {self.setup.threshold}, so no sum is revealed"
            )
        self.stage = ServerStage.UNMASKING

    def signatures_for(self, site: str) -> SurvivorSignatures:
        """The request and the signatures on it from ``site``'s neighbours."""
        self._expect(ServerStage.UNMASKING, "relay survivor signatures")
        assert self._request is not None
        if site not in self._signatures:
            raise SecAggError(f"site '{site}' did not sign the survivor list")
        paired = self._delivered[site]
        return SurvivorSignatures(
            study_hash=self.setup.study_hash,
            round=self.setup.round,
            session=self.setup.session,
            request=self._request,
            signatures=tuple(self._signatures[p] for p in paired if p in self._signatures),
        )

    @property
    def answered(self) -> set[str]:
        """Survivors whose unmasking shares have arrived."""
        return set(self._replies)

    def receive_unmask(self, reply: UnmaskReply) -> None:
        self._expect(ServerStage.UNMASKING, "take unmasking shares")
        self._check(reply, reply.site)
        assert self._request is not None
        if reply.site not in self._signatures:
            raise SecAggError(f"site '{reply.site}' did not sign the survivors and cannot unmask")
        if not set(reply.seed_shares) <= set(self._request.survivors) or not set(
            reply.key_shares
        ) <= set(self._request.dropped):
            raise SecAggError(f"the unmasking reply of '{reply.site}' names the wrong sites")
        self._replies.setdefault(reply.site, reply)

    def _rebuild(self, owner: str, kind: str) -> bytes:
        shares: dict[int, int] = {}
        for holder, reply in self._replies.items():
            table = reply.seed_shares if kind == "seed" else reply.key_shares
            if owner in table:
                shares[self.setup.index(holder)] = int(table[owner], 16)
        if len(shares) < self.setup.threshold:
            what = "self-mask" if kind == "seed" else "pairwise masks"
            raise self.fail(
                f"cannot remove the {what} of '{owner}': {len(shares)} share(s), "
                f"{self.setup.threshold} needed"
            )
        try:
            return shamir.reconstruct(shares, self.setup.threshold, 32)
        except ValueError as exc:
            raise self.fail(f"the shares for '{owner}' are inconsistent: {exc}") from exc

    def finish(self) -> NDArray[np.unsignedinteger]:
        """The sum of the survivors' inputs in Z_{2^bits}, or :class:`SecAggFailedError`."""
        self._expect(ServerStage.UNMASKING, "finish")
        assert self._request is not None
        total = self._total
        # Every secret is rebuilt and checked first, so all the masks go in one pass.
        terms = [(self._rebuild(site, "seed"), -1) for site in self._request.survivors]
        label = self.setup.label("mask")
        for gone in self._request.dropped:
            secret = self._rebuild(gone, "key")
            if public_of(secret) != self._adverts[gone].mask_key:
                raise self.fail(f"the shares of '{gone}' do not rebuild its advertised key")
            terms += [
                (agree(secret, self._adverts[site].mask_key, label), -1 if site < gone else 1)
                for site in self._request.survivors
                if gone in self._delivered[site]
            ]
        add_masks(total, terms, self.setup.bits)
        self.stage = ServerStage.DONE
        self._total = np.zeros(0, dtype=total.dtype)
        return total
