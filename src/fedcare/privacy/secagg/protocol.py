"""The SecAgg+ stage sequence, defined once: what each stage relays, what sites post, and
when the coordinator closes it. The simulation, the networked coordinator and site,
and the benchmark all drive this module; only the transport between them differs.

A session has five stages, in :data:`STAGES` order. For each stage a site first
fetches what the coordinator relays for it (nothing for ``advertise``), then posts
its message; the coordinator closes the stage once every site expected has
posted or its deadline has passed, and the next stage's relay becomes available
(over the network a site's post brings it back when it opens in time:
:func:`stage_after`).

============  =============================  ===================================
stage         relayed to the site            the site posts
============  =============================  ===================================
advertise     (nothing)                      its signed public keys
shares        its neighbours' signed keys    sealed shares of its secrets
masked        the shares sealed for it       its masked input
confirm       the unmasking request          its signature on that request
unmask        the request and signatures     shares of seeds / of dropped keys
============  =============================  ===================================

Every message crosses as bytes (JSON, or safetensors for the masked input) and
is parsed and checked on arrival, in process as over the network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from pydantic import TypeAdapter, ValidationError

from fedcare.models.wire import DEFAULT_MAX_BYTES, PayloadError
from fedcare.privacy.secagg.aggregator import SecAggServer, ServerStage
from fedcare.privacy.secagg.client import SecAggClient
from fedcare.privacy.secagg.keys import IdentityVerifier, SecAggError
from fedcare.privacy.secagg.messages import (
    EncryptedShare,
    KeyAdvertisement,
    ShareBundle,
    SurvivorSignature,
    SurvivorSignatures,
    UnmaskReply,
    UnmaskRequest,
)
from fedcare.privacy.secagg.session import RoundSetup
from fedcare.privacy.secagg.wire import MaskedHeader, decode_masked, encode_masked


class Stage(StrEnum):
    """What a site posts, in order."""

    ADVERTISE = "advertise"
    SHARES = "shares"
    MASKED = "masked"
    CONFIRM = "confirm"
    UNMASK = "unmask"


STAGES: tuple[Stage, ...] = tuple(Stage)
COLLECTING: dict[Stage, ServerStage] = {
    Stage.ADVERTISE: ServerStage.ADVERTISING,
    Stage.SHARES: ServerStage.SHARING,
    Stage.MASKED: ServerStage.MASKING,
    Stage.CONFIRM: ServerStage.CONFIRMING,
    Stage.UNMASK: ServerStage.UNMASKING,
}
"""The coordinator's stage while it collects each site message."""

_ADVERTS = TypeAdapter(tuple[KeyAdvertisement, ...])
_SHARES = TypeAdapter(tuple[EncryptedShare, ...])


def stage_after(stage: Stage) -> Stage | None:
    """The stage whose relay a site fetches once it has posted ``stage``; None after the
    last."""
    index = STAGES.index(stage) + 1
    return STAGES[index] if index < len(STAGES) else None


def stage_named(name: str) -> Stage:
    """The stage called ``name`` in a URL, or :class:`SecAggError`."""
    try:
        return Stage(name)
    except ValueError:
        raise SecAggError(
            f"no secure-aggregation stage '{name}' (stages: {', '.join(STAGES)})"
        ) from None


class Party(Protocol):
    """A site in a session, as the driver sees it: bytes in, bytes out, one call per stage."""

    @property
    def name(self) -> str:
        """The site's name."""
        ...

    def respond(self, stage: Stage, relayed: bytes | None) -> bytes:
        """The site's message for ``stage``, given what the coordinator relayed for it."""
        ...


InputSource = Callable[[], tuple[NDArray[np.unsignedinteger], float | None]]
"""Called once, when the site masks: its encoded input and the loss it may report."""


class ClientParty:
    """A :class:`SecAggClient` with its input, speaking the wire format of each stage.

    ``before_masked`` runs after the input is masked and before its bytes are
    returned: the site's last chance to refuse (and to record what it sends).
    """

    def __init__(
        self,
        client: SecAggClient,
        source: InputSource,
        before_masked: Callable[[bytes], None] | None = None,
    ) -> None:
        self.client = client
        self._source = source
        self._before_masked = before_masked

    @property
    def name(self) -> str:
        return self.client.site

    def respond(self, stage: Stage, relayed: bytes | None) -> bytes:
        client = self.client
        try:
            if stage is Stage.ADVERTISE:
                return client.advertise().model_dump_json().encode()
            if relayed is None:
                raise SecAggError(f"stage {stage} needs the coordinator's relay")
            if stage is Stage.SHARES:
                return client.share_keys(_ADVERTS.validate_json(relayed)).model_dump_json().encode()
            if stage is Stage.MASKED:
                shares = _SHARES.validate_json(relayed)
                encoded, loss = self._source()
                setup = client.setup
                body = encode_masked(
                    MaskedHeader(
                        study_hash=setup.study_hash,
                        round=setup.round,
                        session=setup.session,
                        site=client.site,
                        bits=setup.bits,
                        loss=loss,
                    ),
                    client.masked_input(shares, encoded),
                )
                if self._before_masked is not None:
                    self._before_masked(body)
                return body
            if stage is Stage.CONFIRM:
                request = UnmaskRequest.model_validate_json(relayed)
                return client.confirm(request).model_dump_json().encode()
            proof = SurvivorSignatures.model_validate_json(relayed)
            return client.unmask(proof).model_dump_json().encode()
        except ValidationError as exc:
            raise SecAggError(f"the coordinator's relay for stage {stage} is malformed") from exc


@dataclass
class ServerSession:
    """The coordinator's side of one session, message by message, in wire form;
    ``verifier`` checks key advertisements against the consortium CA before any is relayed."""

    setup: RoundSetup
    verifier: IdentityVerifier
    max_bytes: int = DEFAULT_MAX_BYTES
    server: SecAggServer = field(init=False)
    losses: dict[str, float | None] = field(default_factory=dict)
    _total: NDArray[np.unsignedinteger] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.server = SecAggServer(self.setup, self.verifier)

    @property
    def stage(self) -> Stage | None:
        """The stage being collected; None once the session is done or failed."""
        for stage, collecting in COLLECTING.items():
            if self.server.stage is collecting:
                return stage
        return None

    @property
    def succeeded(self) -> bool:
        """True once every stage has closed and the session did not fail."""
        return self.stage is None and self.server.stage is not ServerStage.FAILED

    def posted(self, stage: Stage) -> tuple[str, ...]:
        """Who has posted in ``stage`` so far."""
        server = self.server
        if stage is Stage.ADVERTISE:
            return server.advertised
        if stage is Stage.SHARES:
            return server.shared
        if stage is Stage.MASKED:
            return server.submitted
        if stage is Stage.CONFIRM:
            return server.confirmed
        return tuple(sorted(server.answered))

    def expected(self, stage: Stage) -> tuple[str, ...]:
        """Who may post in ``stage``: every participant first, then those who posted in the
        stage before it."""
        index = STAGES.index(stage)
        return self.setup.sites if index == 0 else self.posted(STAGES[index - 1])

    def complete(self, excused: AbstractSet[str] = frozenset()) -> bool:
        """True when everyone expected in the current stage has posted, but for the
        ``excused`` (sites that said they left)."""
        stage = self.stage
        # A site whose advertisement was refused is not waited for (it may still retry).
        gone = excused | set(self.server.refused)
        waiting = set(self.expected(stage)) - gone if stage is not None else set()
        return stage is not None and waiting <= set(self.posted(stage))

    def post(self, site: str, stage: Stage, body: bytes) -> None:
        """Take one message from the authenticated ``site``; :class:`SecAggError` if refused."""
        server = self.server
        current = self.stage
        if current is not stage:
            closed = current is None or STAGES.index(current) > STAGES.index(stage)
            if closed and server.stage is not ServerStage.FAILED and site in self.posted(stage):
                # A retried post (the reply was lost) of a stage that has closed since:
                # the first message counted, and a repeat changes nothing.
                return
            raise SecAggError(
                f"'{site}' posts to stage {stage}, but the session is "
                f"{'over' if self.stage is None else 'in stage ' + self.stage}"
            )
        try:
            if stage is Stage.ADVERTISE:
                adv = KeyAdvertisement.model_validate_json(body)
                _identity(adv.site, site)
                server.receive_advertisement(adv)
            elif stage is Stage.SHARES:
                bundle = ShareBundle.model_validate_json(body)
                _identity(bundle.sender, site)
                server.receive_shares(bundle)
            elif stage is Stage.MASKED:
                header, masked = decode_masked(
                    body, self.setup.length, self.setup.bits, self.max_bytes
                )
                _identity(header.site, site)
                if header.session != self.setup.session:
                    raise SecAggError("the masked input is for another secure session")
                if server.receive_masked(site, masked):
                    self.losses[site] = header.loss
            elif stage is Stage.CONFIRM:
                signature = SurvivorSignature.model_validate_json(body)
                _identity(signature.site, site)
                server.receive_confirmation(signature)
            else:
                reply = UnmaskReply.model_validate_json(body)
                _identity(reply.site, site)
                server.receive_unmask(reply)
        except ValidationError as exc:
            raise PayloadError(f"the {stage} message is invalid: {exc}") from exc

    def relay(self, site: str, stage: Stage) -> bytes | None:
        """What ``site`` needs before posting ``stage``; None while the stage before is open.

        A site that is not expected in ``stage`` (it missed the stage before, or the
        coordinator restarted) is told at once, so it stops waiting.
        """
        server = self.server
        if server.stage is ServerStage.FAILED:
            raise SecAggError(f"secure aggregation failed: {server.reason}")
        current = self.stage
        if stage is Stage.ADVERTISE:
            return b""
        before = STAGES[STAGES.index(stage) - 1]
        if current is before:
            if site not in self.posted(before):
                raise SecAggError(f"'{site}' has not posted {before} in this session")
            return None
        if current is None or STAGES.index(current) > STAGES.index(stage):
            raise SecAggError(f"stage {stage} of this session has closed")
        if site not in self.expected(stage):
            raise SecAggError(f"'{site}' did not post {before} in time and sits out")
        if stage is Stage.SHARES:
            return _ADVERTS.dump_json(server.advertisements_for(site))
        if stage is Stage.MASKED:
            return _SHARES.dump_json(server.shares_for(site))
        if stage is Stage.CONFIRM:
            assert server.request is not None
            return server.request.model_dump_json().encode()
        return server.signatures_for(site).model_dump_json().encode()

    def close(self) -> None:
        """Close the current stage: the next one's relay opens, or the sum is ready."""
        server = self.server
        closers = {
            Stage.ADVERTISE: server.close_advertising,
            Stage.SHARES: server.close_sharing,
            Stage.MASKED: server.close_masking,
            Stage.CONFIRM: server.close_confirming,
        }
        stage = self.stage
        if stage is None:
            raise SecAggError("the session is over")
        if stage is Stage.UNMASK:
            self._total = server.finish()
            return
        closers[stage]()

    def result(self) -> tuple[NDArray[np.unsignedinteger], tuple[str, ...]]:
        """The unmasked sum and who is in it, once the unmask stage has closed."""
        if self.server.stage is not ServerStage.DONE:
            raise SecAggError(f"the session has no sum (stage {self.server.stage})")
        request = self.server.request
        assert request is not None
        assert self._total is not None
        return self._total, request.survivors


def _identity(claimed: str, site: str) -> None:
    if claimed != site:
        raise SecAggError(f"'{site}' sent a message claiming to come from '{claimed}'")


def run_session(
    session: ServerSession,
    parties: Mapping[str, Party],
    gone: Mapping[str, Stage] | None = None,
    refusals: dict[str, str] | None = None,
) -> tuple[NDArray[np.unsignedinteger], tuple[str, ...]]:
    """Drive a whole session in this process: the unmasked sum and who is in it.

    ``parties`` are the sites that answer at all; a site in ``gone`` stops
    answering from the given stage on. A site that refuses (an honest site's
    :class:`SecAggError`) sits the rest of the session out, as on the network,
    and its reason goes into ``refusals``. The session fails with
    :class:`SecAggError` when too few sites are left.
    """
    out: dict[str, Stage] = dict(gone or {})
    for stage in STAGES:
        for site in session.expected(stage):
            party = parties.get(site)
            if party is None or (site in out and STAGES.index(out[site]) <= STAGES.index(stage)):
                continue
            relayed = session.relay(site, stage)
            try:
                body = party.respond(stage, relayed)
            except SecAggError as exc:
                out[site] = stage
                if refusals is not None:
                    refusals[site] = str(exc)
                continue
            session.post(site, stage, body)
        session.close()
    return session.result()
