"""Secure aggregation in the study contract and in the simulation."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcare.federation.engine import Federation, RoundOutcome
from fedcare.federation.messages import TaskReply, TaskState
from fedcare.federation.rounds import RoundError, SummedUpdate
from fedcare.releases.registry import ReleaseRegistry
from fedcare.simulation.inprocess import run_in_process
from fedcare.simulation.runner import SimulationOptions, run_federation, run_simulation
from fedcare.site.dataset import SiteDataset
from fedcare.site.link import CoordinatorError
from fedcare.site.worker import SiteWorker
from fedcare.study import Study, StudyError

from .conftest import DropBefore, LinkWrapper

SECURE = {"enabled": True, "clip_norm": 10.0, "max_sites": 10, "max_records": 1000}


def _secure(study: Study, **changes: object) -> Study:
    return study.replace(secure_aggregation={**SECURE, **changes})


def _run(study: Study, sites: list[SiteDataset], offline: frozenset[str] = frozenset()):
    n_params = study.feature_schema.n_inputs + 1
    workers = {s.name: SiteWorker(study, s, n_params) for s in sites}
    run = run_federation(study, sites, workers=workers, offline=offline)
    return run.params, run.rounds


def test_secure_federation_matches_plain_within_quantisation(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    # Equal weights: under secure aggregation a site weights by a bucket of its count.
    toy_study = toy_study.replace(aggregation={"weighting": "equal"})
    plain, _ = _run(toy_study, toy_sites)
    secure_study = _secure(toy_study)
    secure, records = _run(secure_study, toy_sites)
    assert all(r.status == "closed" for r in records)
    assert all(r.participants == ["alpha", "beta", "gamma"] for r in records)
    assert records[0].mean_train_loss is not None
    # Four rounds of stochastic rounding at 2^-24 (clip_norm 10, 10 sites) and weights at 2^-27.
    np.testing.assert_allclose(secure, plain, atol=1e-5)
    assert not np.array_equal(secure, plain)
    sparse, _ = _run(_secure(toy_study, graph="sparse", degree=2), toy_sites)
    np.testing.assert_allclose(sparse, plain, atol=1e-5)


def test_secure_round_survives_an_offline_site_and_fails_below_threshold(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    study = _secure(toy_study)
    _, records = _run(study, toy_sites, frozenset({"gamma"}))
    assert all(r.participants == ["alpha", "beta"] for r in records)
    assert all(r.status == "closed" for r in records)
    # gamma never answers and beta loses power before masking: alpha alone cannot
    # rebuild beta's masks, so no round can unmask its sum.
    records = []
    study = study.replace(rounds={**study.rounds.model_dump(), "count": 10})
    n_params = study.feature_schema.n_inputs + 1
    workers = {s.name: SiteWorker(study, s, n_params) for s in toy_sites}
    service = run_in_process(
        study,
        workers,
        frozenset({"gamma"}),
        on_round=lambda report: records.append(report.outcome),
        wrap=lambda name, link: DropBefore(link, "masked") if name == "beta" else link,
    )
    params = service.federation.params
    # Rounds fail until beta and gamma have missed inactive_after rounds in a row (beta's
    # first does not count: it advertised keys); then alpha alone is too few and it halts.
    assert len(records) == study.rounds.inactive_after + 1
    assert "only 1 active site(s)" in service.halted
    assert all(r.status.value == "failed" for r in records)
    assert "secure aggregation failed" in records[0].reason
    assert "threshold" in records[0].reason
    assert not params.any()


class _PostsTwice(LinkWrapper):
    """A site's link on which every reply to a secure post is lost once: the site's
    retry posts the same message again, after the coordinator has acted on the first
    (for the last unmask post of a round, after the round has closed). It keeps what
    the coordinator said to each retry it refused."""

    def __init__(self, inner: Any, refused: list[str]) -> None:
        super().__init__(inner)
        self.refused = refused

    def secure_post(
        self, study_hash: str, round_number: int, stage: str, body: bytes, content_type: str
    ) -> bytes | None:
        self.inner.secure_post(study_hash, round_number, stage, body, content_type)
        try:
            reply: bytes | None = self.inner.secure_post(
                study_hash, round_number, stage, body, content_type
            )
        except CoordinatorError as exc:
            self.refused.append(f"round {round_number} {stage}: {exc.status} {exc.detail}")
            raise
        return reply


def test_secure_posts_whose_replies_are_lost_count_once_and_complete_the_round(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    study = _secure(toy_study)
    n_params = study.feature_schema.n_inputs + 1
    records: list[RoundOutcome] = []
    refused: list[str] = []
    workers = {s.name: SiteWorker(study, s, n_params) for s in toy_sites}
    service = run_in_process(
        study,
        workers,
        on_round=lambda report: records.append(report.outcome),
        wrap=lambda name, link: _PostsTwice(link, refused),
    )
    assert refused == []
    assert service.finished
    assert [r.status.value for r in records] == ["closed"] * study.rounds.count
    assert all(tuple(r.participants) == ("alpha", "beta", "gamma") for r in records)
    expected, _ = _run(study, toy_sites)
    np.testing.assert_array_equal(service.federation.params, expected)


def test_secure_simulation_end_to_end(toy_study: Study, toy_sites: list[SiteDataset]) -> None:
    result = run_simulation(_secure(toy_study), toy_sites, SimulationOptions(baselines=False))
    assert all((m.auroc or 0) > 0.7 for m in result.matrix["federated"].values())


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"enabled": True}, "needs clip_norm"),
        ({**SECURE, "graph": "sparse", "degree": 3}, "even degree"),
        ({**SECURE, "degree": 4}, "only used with graph 'sparse'"),
        ({**SECURE, "max_sites": 1000, "fraction_bits": 24}, "could reach"),
        ({**SECURE, "max_sites": 5_000_000}, "steps per site"),
        ({**SECURE, "threshold": 0.5}, "greater than 0.5"),
        ({**SECURE, "bits": 16}, "bits"),
    ],
)
def test_bad_secure_aggregation_settings_are_refused(
    toy_study: Study, section: dict[str, object], message: str
) -> None:
    with pytest.raises(StudyError, match=message):
        toy_study.replace(secure_aggregation=section)


def test_secure_aggregation_refuses_capped_weighting(toy_study: Study) -> None:
    capped = toy_study.replace(aggregation={"weighting": "capped", "cap": 0.6})
    with pytest.raises(StudyError, match="capped"):
        capped.replace(secure_aggregation=SECURE)


def test_more_sites_than_max_sites_are_refused(toy_study: Study) -> None:
    study = _secure(toy_study, max_sites=2)
    with pytest.raises(ValueError, match="max_sites"):
        Federation(study, ["a", "b", "c"], np.zeros(4, np.float32))


def test_round_takes_either_a_secure_sum_or_updates(toy_study: Study) -> None:
    federation = Federation(_secure(toy_study), ["a", "b", "c"], np.zeros(3, np.float32))
    round_, _ = federation.open_round(now=0.0)
    summed = SummedUpdate(("a", "b"), np.array([2.0, 4.0, 6.0]), 2.0, 0.5)
    with pytest.raises(RoundError, match="selected"):
        round_.submit_sum(SummedUpdate(("a", "zz"), np.zeros(3), 1.0))
    round_.submit_sum(summed)
    with pytest.raises(RoundError, match="no secure sum"):
        round_.submit_sum(summed)
    outcome = federation.finish_round(round_, now=round_.deadline)
    assert outcome.participants == ("a", "b")
    assert outcome.mean_loss == 0.5
    np.testing.assert_allclose(federation.params, [1.0, 2.0, 3.0])


def test_differencing_two_secure_sums_reveals_no_exact_record_count(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    """Issue 12, point 3: the weight sums of two rounds, one without a site, differ by that
    site's weight. Without DP that is its count's public bucket; under DP, its noisy count."""
    from fedcare.federation.service import RoundReport
    from fedcare.privacy.dp.counts import bucket
    from fedcare.simulation.inprocess import run_in_process

    def weight_sums(study: Study) -> tuple[float, float]:
        n_params = study.feature_schema.n_inputs + 1
        one_round = study.replace(rounds={**study.rounds.model_dump(), "count": 1})
        workers = {s.name: SiteWorker(one_round, s, n_params) for s in toy_sites}
        sums: list[float] = []

        def keep(report: RoundReport) -> None:
            assert report.outcome.weight_sum is not None
            sums.append(report.outcome.weight_sum)

        for offline in (frozenset(), frozenset({"gamma"})):
            run_in_process(one_round, workers, offline, on_round=keep)
        return sums[0], sums[1]

    gamma = next(s for s in toy_sites if s.name == "gamma")
    max_records = SECURE["max_records"]
    with_all, without = weight_sums(_secure(toy_study))
    learned = (with_all - without) * max_records
    assert learned == pytest.approx(bucket(gamma.n_train), abs=0.01)
    assert round(learned) != gamma.n_train
    dp = _secure(toy_study).replace(privacy={"dp": True, "epsilon": 8.0, "delta": 1e-4})
    learned_dp = []
    for _ in range(3):
        with_all, without = weight_sums(dp)
        learned_dp.append(round((with_all - without) * max_records))
    # Fresh noise per run (a site reuses its one noisy count within a study).
    assert len(set(learned_dp)) > 1


class _NamesOtherSites(LinkWrapper):
    """A coordinator that tells one site, with each task, another list of the round's
    sites than it tells the rest (``sites``), or none."""

    def __init__(self, inner: object, sites: tuple[str, ...]) -> None:
        super().__init__(inner)
        self.sites = sites

    def task(self, study_hash: str) -> TaskReply:
        reply: TaskReply = self.inner.task(study_hash)
        if reply.state is TaskState.READY:
            return dataclasses.replace(reply, sites=self.sites)
        return reply


@pytest.mark.parametrize("shown", [("alpha", "gamma"), ()], ids=["fewer", "none"])
def test_a_site_shown_other_participants_is_left_out_and_reveals_nothing(
    toy_study: Study, toy_sites: list[SiteDataset], shown: tuple[str, ...]
) -> None:
    """The participants travel with the task: a site named another list sets up another
    session (or, named none, sits the round out), and no round sums its input."""
    study = _secure(toy_study).replace(rounds={**toy_study.rounds.model_dump(), "count": 2})
    n_params = study.feature_schema.n_inputs + 1
    workers = {s.name: SiteWorker(study, s, n_params) for s in toy_sites}
    outcomes = []
    run_in_process(
        study,
        workers,
        on_round=lambda report: outcomes.append(report.outcome),
        wrap=lambda name, link: _NamesOtherSites(link, shown) if name == "beta" else link,
    )
    assert [o.status.value for o in outcomes] == ["closed", "closed"]
    assert all(o.participants == ("alpha", "gamma") for o in outcomes)


class _Recording(LinkWrapper):
    """A site's link that notes, in order, the calls that matter here."""

    def __init__(self, inner: object, calls: list[str]) -> None:
        super().__init__(inner)
        self.calls = calls

    def task(self, study_hash: str) -> TaskReply:
        reply: TaskReply = self.inner.task(study_hash)
        if reply.state is TaskState.READY:
            self.calls.append("task")
        return reply

    def secure_post(
        self, study_hash: str, round_number: int, stage: str, body: bytes, content_type: str
    ) -> bytes | None:
        self.calls.append(stage)
        reply: bytes | None = self.inner.secure_post(
            study_hash, round_number, stage, body, content_type
        )
        return reply

    def validation_task(self, study_hash: str) -> tuple[int, bytes] | None:
        self.calls.append("validation")
        task: tuple[int, bytes] | None = self.inner.validation_task(study_hash)
        return task


def test_a_site_asks_for_validation_work_only_between_rounds(
    toy_study: Study, toy_sites: list[SiteDataset], tmp_path: Path
) -> None:
    """A candidate opens only when a round closes: from its task to its last post of a
    round a site asks nothing else; between rounds it asks, and validates candidates."""
    study = _secure(toy_study).replace(
        rounds={**toy_study.rounds.model_dump(), "count": 4},
        validation={**toy_study.canonical()["validation"], "every": 2},
        disclosure={
            **toy_study.canonical()["disclosure"],
            "artefacts": ["model_updates", "metrics"],
        },
    )
    assert study.validates_releases
    n_params = study.feature_schema.n_inputs + 1
    workers = {s.name: SiteWorker(study, s, n_params) for s in toy_sites}
    calls: list[str] = []
    registry = ReleaseRegistry.open(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path)
    try:
        run_in_process(
            study,
            workers,
            registry=registry,
            wrap=lambda name, link: _Recording(link, calls) if name == "alpha" else link,
        )
        assert len(registry.releases(study.content_hash)) == 2
    finally:
        registry.close()
    rounds = "".join("T" if c == "task" else "V" if c == "validation" else "." for c in calls)
    # T, then the five stage posts, with no V between: four rounds, each asked between.
    inside = [r[: r.index(".....") + 5] for r in rounds.split("T")[1:]]
    assert len(inside) == 4
    assert all(part == "....." for part in inside)
    assert "V" in rounds.split("T")[0]
    assert all("V" in r[5:] for r in rounds.split("T")[1:])
