"""The coordinator's relay for a securely aggregated round (SecAgg+ over HTTP).

Sites post their signed keys, sealed shares, masked input and unmasking shares;
the relay hands each site what it needs for the next stage. A stage closes
when every site expected has answered or its deadline has passed (dropouts).
The relay keeps only the running masked total, in memory: it never receives,
stores or logs a site's update in the clear. If the coordinator restarts in
the middle of a secure round, the round starts its secure aggregation over.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from pydantic import TypeAdapter, ValidationError

from fedcare.federation.rounds import Round, RoundError, SummedUpdate
from fedcare.models.wire import PayloadError
from fedcare.privacy.secagg.keys import SecAggError
from fedcare.privacy.secagg.messages import (
    EncryptedShare,
    KeyAdvertisement,
    ShareBundle,
    UnmaskReply,
)
from fedcare.privacy.secagg.quantize import decode_sum
from fedcare.privacy.secagg.server import SecAggServer, ServerStage
from fedcare.privacy.secagg.study import quantization_for, setup_for
from fedcare.privacy.secagg.wire import decode_masked
from fedcare.study import Study

STAGES = ("advertise", "keys", "shares", "masked", "unmask")
"""What sites post (advertise, shares, masked, unmask) and fetch (keys, shares, unmask)."""

_ADVERTS = TypeAdapter(tuple[KeyAdvertisement, ...])
_SHARES = TypeAdapter(tuple[EncryptedShare, ...])


class SecureRelayError(RoundError):
    """A secure-aggregation message the relay refuses (maps to 409)."""


class SecureRelay:
    """One secure round at the coordinator."""

    def __init__(
        self, study: Study, round_: Round, n_params: int, now: float, max_bytes: int
    ) -> None:
        self.study = study
        self.setup = setup_for(study, round_.number, round_.selected, n_params)
        self.server = SecAggServer(self.setup)
        self.plan = quantization_for(study)
        self.stage_s = study.rounds.deadline_s
        self.stage_deadline = max(round_.deadline, now)
        self.max_bytes = max_bytes
        self.losses: dict[str, float] = {}

    def wants_task(self, site: str) -> bool:
        """True while ``site`` can still join this round by advertising keys."""
        return self.server.stage is ServerStage.ADVERTISING and site not in self.server.advertised

    def _identity(self, claimed: str, site: str) -> None:
        if claimed != site:
            raise SecureRelayError(f"'{site}' sent a message claiming to come from '{claimed}'")

    def post(self, site: str, stage: str, body: bytes) -> None:
        """Take one message from an authenticated ``site``."""
        try:
            if stage == "advertise":
                adv = KeyAdvertisement.model_validate_json(body)
                self._identity(adv.site, site)
                self.server.receive_advertisement(adv)
            elif stage == "shares":
                bundle = ShareBundle.model_validate_json(body)
                self._identity(bundle.sender, site)
                self.server.receive_shares(bundle)
            elif stage == "masked":
                header, masked = decode_masked(
                    body, self.setup.length, self.setup.bits, self.max_bytes
                )
                self._identity(header.site, site)
                if header.study_hash != self.setup.study_hash or header.round != self.setup.round:
                    raise SecureRelayError("the masked input is for another study or round")
                if self.server.receive_masked(site, masked):
                    self.losses[site] = header.loss
            elif stage == "unmask":
                reply = UnmaskReply.model_validate_json(body)
                self._identity(reply.site, site)
                self.server.receive_unmask(reply)
            else:
                raise SecureRelayError(f"sites do not post to stage '{stage}'")
        except ValidationError as exc:
            raise PayloadError(f"the {stage} message is invalid: {exc}") from exc
        except SecAggError as exc:
            raise SecureRelayError(str(exc)) from exc

    def fetch(self, site: str, stage: str) -> bytes | None:
        """What ``site`` needs for its next step, or None if that stage has not closed yet."""
        server = self.server
        if server.stage is ServerStage.FAILED:
            raise SecureRelayError(f"secure aggregation failed: {server.reason}")
        try:
            # A site waiting on a stage it has not joined (the coordinator restarted, or
            # it was too late) is told at once, so it can start the round again.
            if stage == "keys":
                if site not in server.advertised:
                    raise SecureRelayError(f"'{site}' has no key advertisement in this round")
                if server.stage is ServerStage.ADVERTISING:
                    return None
                return _ADVERTS.dump_json(server.advertisements_for(site))
            if stage == "shares":
                if site not in server.shared:
                    raise SecureRelayError(f"'{site}' has sent no shares in this round")
                if server.stage is ServerStage.SHARING:
                    return None
                if server.stage is not ServerStage.MASKING:
                    raise SecureRelayError("the masking stage of this round has closed")
                return _SHARES.dump_json(server.shares_for(site))
            if stage == "unmask":
                if site not in server.submitted:
                    raise SecureRelayError(f"'{site}' has no masked input in this round")
                request = server.request
                if request is None:
                    return None
                return request.model_dump_json().encode()
        except SecAggError as exc:
            raise SecureRelayError(str(exc)) from exc
        raise SecureRelayError(f"sites do not fetch stage '{stage}'")

    def _all_in(self, have: Sequence[str], expected: Sequence[str]) -> bool:
        return set(expected) <= set(have)

    def advance(self, now: float, round_: Round) -> bool:
        """Close stages that are complete or past their deadline. True once the round has
        its secure sum or has failed."""
        server = self.server
        try:
            while True:
                due = now >= self.stage_deadline
                stage = server.stage
                if stage is ServerStage.ADVERTISING and (
                    due or self._all_in(server.advertised, self.setup.sites)
                ):
                    server.close_advertising()
                elif stage is ServerStage.SHARING and (
                    due or self._all_in(server.shared, server.advertised)
                ):
                    server.close_sharing()
                elif stage is ServerStage.MASKING and (
                    due or self._all_in(server.submitted, server.shared)
                ):
                    server.close_masking()
                elif stage is ServerStage.UNMASKING and (due or self._unmask_complete()):
                    self._finish(round_)
                    return True
                else:
                    return False
                self.stage_deadline = now + self.stage_s
        except SecAggError as exc:
            round_.fail(f"secure aggregation failed: {exc}")
            return True

    def _unmask_complete(self) -> bool:
        request = self.server.request
        return request is not None and self.server.answered >= set(request.survivors)

    def _finish(self, round_: Round) -> None:
        request = self.server.request
        assert request is not None
        total = self.server.finish()
        weighted, weight_sum = decode_sum(total, self.plan)
        round_.submit_sum(
            SummedUpdate(
                participants=request.survivors,
                weighted_sum=weighted,
                weight_sum=weight_sum,
                mean_loss=statistics.fmean(self.losses[s] for s in request.survivors),
            )
        )
