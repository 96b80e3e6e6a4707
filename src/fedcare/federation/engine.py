"""The coordinator's side of a study, independent of how bytes move.

:class:`Federation` owns the global model, opens rounds, selects sites and
applies the server optimiser when a round closes. The study service
(:mod:`fedcare.federation.service`) drives it, in simulation and over the network.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
from numpy.typing import NDArray

from fedcare.aggregation import make_server_optimizer, staleness_factor
from fedcare.federation.messages import Task, TaskHeader
from fedcare.federation.rounds import Round, RoundError, RoundStatus
from fedcare.ids import derive_seed
from fedcare.study import Study


@dataclass(frozen=True)
class RoundOutcome:
    number: int
    status: RoundStatus
    participants: tuple[str, ...]
    reason: str
    mean_loss: float | None
    weight_sum: float | None = None
    """A secure round's sum of weights: the one number about the sites the coordinator
    learns beside the summed update."""


class Federation:
    """Global model and round bookkeeping for one study."""

    def __init__(
        self, study: Study, sites: list[str], initial: NDArray[np.float32], round_number: int = 0
    ) -> None:
        if len(set(sites)) != len(sites):
            raise ValueError("site names must be unique")
        if len(sites) < study.rounds.min_sites:
            raise ValueError(
                f"the study needs at least {study.rounds.min_sites} site(s), {len(sites)} joined"
            )
        secure = study.secure_aggregation
        if secure.enabled and len(sites) > secure.max_sites:
            raise ValueError(
                f"{len(sites)} sites joined but secure_aggregation.max_sites is "
                f"{secure.max_sites}: their sum could overflow; raise max_sites"
            )
        self.study = study
        self.sites = sorted(sites)
        self._members = frozenset(sites)
        self.params = initial.astype(np.float32)
        self.round_number = round_number
        self.optimizer = make_server_optimizer(study.aggregation)

    @property
    def done(self) -> bool:
        return self.round_number >= self.study.rounds.count

    def add_site(self, site: str) -> None:
        """A site that joined a running study: selectable from the next round opened."""
        secure = self.study.secure_aggregation
        if secure.enabled and len(self.sites) + 1 > secure.max_sites:
            raise ValueError(
                f"a site more would exceed secure_aggregation.max_sites {secure.max_sites}"
            )
        if site not in self._members:
            self.sites = sorted([*self.sites, site])
            self._members = frozenset(self.sites)

    def is_member(self, site: str) -> bool:
        """Whether ``site`` is one of the study's sites (in constant time: a thousand sites
        each ask several times a round)."""
        return site in self._members

    def select(self, number: int, eligible: Sequence[str] | None = None) -> tuple[str, ...]:
        """Sites for round ``number`` among ``eligible`` (default: every member): all of
        them, or a seeded random fraction."""
        pool = sorted(self.sites if eligible is None else eligible)
        fraction = self.study.rounds.fraction
        if fraction >= 1.0:
            return tuple(pool)
        k = min(len(pool), max(self.study.rounds.min_sites, math.ceil(fraction * len(pool))))
        rng = np.random.default_rng(derive_seed(self.study.seed, "select", number))
        return tuple(sorted(rng.choice(pool, size=k, replace=False).tolist()))

    def open_round(self, now: float, eligible: Sequence[str] | None = None) -> tuple[Round, Task]:
        """Start the next round among ``eligible`` sites; returns it with the task every
        selected site receives."""
        if self.done:
            raise RoundError(f"the study has finished its {self.study.rounds.count} rounds")
        number = self.round_number + 1
        spec = self.study.rounds
        participation = self.study.participation
        round_ = Round(
            study_hash=self.study.content_hash,
            number=number,
            selected=self.select(number, eligible),
            min_sites=spec.min_sites,
            deadline=now + spec.deadline_s,
            extension_s=spec.deadline_s,
            extensions_left=spec.extensions,
            buffer=participation.buffer if participation.is_async else None,
            max_staleness=participation.max_staleness if participation.is_async else 0,
            max_records=self.study.aggregation.max_records,
        )
        header = TaskHeader(
            study_hash=self.study.content_hash,
            round=number,
            seed=derive_seed(self.study.seed, "round", number),
            nonce=secrets.token_hex(16),
        )
        return round_, Task(header=header, params=self.params.copy())

    def finish_round(self, round_: Round, now: float) -> RoundOutcome:
        """Close a due round and, if it aggregated, step the global model."""
        if round_.number != self.round_number + 1:
            raise RoundError(f"round {round_.number} is not the open round")
        agg = self.study.aggregation
        participation = self.study.participation
        factor = (
            partial(staleness_factor, spec=participation.staleness)
            if participation.is_async
            else None
        )
        mean_delta = (
            None
            if round_.finished
            else round_.close(now, agg.weighting, agg.cap, factor, agg.robust)
        )
        if mean_delta is not None:
            before = self.optimizer.state()
            with np.errstate(over="ignore", invalid="ignore"):
                stepped = self.optimizer.step(self.params, mean_delta)
                state = self.optimizer.state()  # as stored: float32
            if all(np.all(np.isfinite(v)) for v in (stepped, *state.values())):
                self.params = stepped
            else:
                # The model a site or the coordinator could not load is never made.
                self.optimizer.load_state(before)
                round_.status = RoundStatus.FAILED
                round_.reason = "the model after this round's step is not finite; it does not move"
            self.round_number = round_.number
        elif round_.status is RoundStatus.FAILED:
            self.round_number = round_.number
        losses = [u.header.loss for u in round_.updates.values() if u.header.loss is not None]
        mean_loss = float(np.mean(losses)) if losses else None
        if round_.summed is not None:
            mean_loss = round_.summed.mean_loss
        return RoundOutcome(
            number=round_.number,
            status=round_.status,
            participants=round_.reporters,
            reason=round_.reason,
            mean_loss=mean_loss,
            weight_sum=None if round_.summed is None else round_.summed.weight_sum,
        )
