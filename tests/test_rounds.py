"""The round state machine and the coordinator's Federation, driven by hand."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest

from fedcare.federation.engine import Federation, derive_seed
from fedcare.federation.messages import SiteUpdate, UpdateHeader
from fedcare.federation.rounds import Round, RoundError, RoundStatus
from fedcare.study import Study, Weighting, parse_study

HASH = "ab" * 32
OTHER_HASH = "cd" * 32


def update(
    site: str,
    delta: list[float],
    n_samples: int = 100,
    *,
    round_: int = 1,
    study_hash: str = HASH,
    loss: float = 0.5,
) -> SiteUpdate:
    return SiteUpdate(
        header=UpdateHeader(
            study_hash=study_hash, round=round_, site=site, n_samples=n_samples, loss=loss
        ),
        delta=np.array(delta, np.float32),
    )


def make_round(**changes: Any) -> Round:
    settings: dict[str, Any] = {
        "study_hash": HASH,
        "number": 1,
        "selected": ("alpha", "beta", "gamma"),
        "min_sites": 2,
        "deadline": 100.0,
    }
    settings.update(changes)
    return Round(**settings)


# --- Round: accepting updates ------------------------------------------------------------


def test_round_accepts_updates_from_selected_sites() -> None:
    r = make_round()
    assert r.status is RoundStatus.OPEN
    assert r.submit(update("alpha", [1.0, 2.0])) is True
    assert r.status is RoundStatus.COLLECTING
    assert r.submit(update("beta", [0.0, 0.0])) is True
    assert sorted(r.updates) == ["alpha", "beta"]


def test_exact_resubmission_is_idempotent() -> None:
    r = make_round()
    first = update("alpha", [1.0, 2.0], n_samples=100)
    assert r.submit(first) is True
    # an equal update built afresh (a retry over the network) is the same update
    assert r.submit(update("alpha", [1.0, 2.0], n_samples=100)) is False
    assert r.submit(first) is False
    assert len(r.updates) == 1
    assert r.updates["alpha"] is first


def test_resubmission_does_not_count_twice_in_the_mean() -> None:
    r = make_round(selected=("alpha", "beta"), min_sites=2)
    r.submit(update("alpha", [4.0], n_samples=100))
    r.submit(update("alpha", [4.0], n_samples=100))
    r.submit(update("beta", [0.0], n_samples=100))
    mean = r.close(now=0.0, weighting=Weighting.SAMPLES)
    assert mean is not None
    np.testing.assert_allclose(mean, [2.0])  # (4 + 0) / 2, not (4 + 4 + 0) / 3


@pytest.mark.parametrize(
    "second",
    [
        update("alpha", [1.0, 2.5]),  # other delta
        update("alpha", [1.0, 2.0], n_samples=101),  # other sample count
        update("alpha", [1.0, 2.0], loss=0.4),  # other loss
    ],
)
def test_a_different_second_update_is_refused(second: SiteUpdate) -> None:
    r = make_round()
    r.submit(update("alpha", [1.0, 2.0]))
    with pytest.raises(RoundError, match=r"site 'alpha' already submitted a different update"):
        r.submit(second)
    np.testing.assert_array_equal(r.updates["alpha"].delta, [1.0, 2.0])


def test_update_for_another_study_is_refused() -> None:
    r = make_round()
    with pytest.raises(RoundError, match=r"update is for a different study"):
        r.submit(update("alpha", [1.0], study_hash=OTHER_HASH))
    assert r.updates == {}
    assert r.status is RoundStatus.OPEN


def test_update_for_another_round_is_refused() -> None:
    r = make_round(number=4)
    with pytest.raises(RoundError, match=r"update is for round 3, this is round 4"):
        r.submit(update("alpha", [1.0], round_=3))
    assert r.updates == {}


def test_update_from_an_unselected_site_is_refused() -> None:
    r = make_round()
    with pytest.raises(RoundError, match=r"site 'delta' was not selected for round 1"):
        r.submit(update("delta", [1.0]))
    assert r.updates == {}


def test_update_after_close_is_refused() -> None:
    r = make_round()
    r.submit(update("alpha", [1.0]))
    r.submit(update("beta", [1.0]))
    assert r.close(now=100.0, weighting=Weighting.SAMPLES) is not None
    with pytest.raises(RoundError, match=r"round 1 is closed; it takes no more updates"):
        r.submit(update("gamma", [1.0]))
    assert "gamma" not in r.updates


def test_update_after_failure_is_refused() -> None:
    r = make_round()
    r.submit(update("alpha", [1.0]))
    r.close(now=100.0, weighting=Weighting.SAMPLES)
    assert r.status is RoundStatus.FAILED
    with pytest.raises(RoundError, match=r"round 1 is failed; it takes no more updates"):
        r.submit(update("beta", [1.0]))


def test_round_needs_selected_sites_and_feasible_min_sites() -> None:
    with pytest.raises(RoundError, match=r"a round needs at least one selected site"):
        make_round(selected=())
    with pytest.raises(RoundError, match=r"min_sites 4 exceeds the 3 selected site\(s\)"):
        make_round(min_sites=4)


# --- Round: due and close ----------------------------------------------------------------


def test_due_when_everyone_reported() -> None:
    r = make_round()
    assert not r.due(now=0.0)
    r.submit(update("alpha", [1.0]))
    r.submit(update("beta", [1.0]))
    assert not r.due(now=99.9)  # enough to close, but neither all nor deadline
    r.submit(update("gamma", [1.0]))
    assert r.due(now=0.0)


@pytest.mark.parametrize(
    ("reported", "excused"),
    [
        ((), ()),
        (("alpha",), ("beta",)),
        (("alpha", "beta"), ("beta",)),  # excused after it reported: its update counts
        (("alpha", "beta"), ("gamma",)),
        (("alpha",), ("beta", "gamma")),
        ((), ("alpha", "beta", "gamma")),
        (("alpha", "beta"), ("alpha", "beta")),
        (("gamma",), ("delta",)),  # not selected: excusing it changes nothing
    ],
)
def test_due_counts_exactly_who_the_round_still_waits_for(
    reported: tuple[str, ...], excused: tuple[str, ...]
) -> None:
    """Before the deadline a round is due exactly when it waits for nobody."""
    r = make_round()
    for site in reported:
        r.submit(update(site, [1.0]))
    for site in excused:
        r.excuse(site)
    assert r.due(now=0.0) == (not r.waiting_for)


def test_due_at_the_deadline() -> None:
    r = make_round(deadline=100.0)
    assert not r.due(now=99.999)
    assert r.due(now=100.0)
    assert r.due(now=250.0)


def test_finished_round_is_never_due() -> None:
    r = make_round()
    r.close(now=100.0, weighting=Weighting.SAMPLES)  # nobody reported: fails
    assert r.finished
    assert not r.due(now=1e9)


def test_close_with_everyone_gives_the_weighted_mean() -> None:
    r = make_round()
    r.submit(update("gamma", [0.5, 0.5], n_samples=600))
    r.submit(update("alpha", [1.0, 2.0], n_samples=100))
    r.submit(update("beta", [-1.0, 0.0], n_samples=300))
    mean = r.close(now=10.0, weighting=Weighting.SAMPLES)
    assert mean is not None
    # weights .1, .3, .6: x = .1 - .3 + .3 = .1; y = .2 + 0 + .3 = .5
    np.testing.assert_allclose(mean, [0.1, 0.5], rtol=1e-6)
    assert mean.dtype == np.float32
    assert r.status is RoundStatus.CLOSED
    assert r.reason == ""


def test_close_after_deadline_with_the_reporters_only() -> None:
    r = make_round()
    r.submit(update("alpha", [1.0, 0.0], n_samples=100))
    r.submit(update("gamma", [0.0, 4.0], n_samples=300))
    mean = r.close(now=100.0, weighting=Weighting.SAMPLES)
    assert mean is not None
    # weights 100/400 and 300/400: [0.25, 3.0]
    np.testing.assert_allclose(mean, [0.25, 3.0], rtol=1e-6)
    assert r.status is RoundStatus.CLOSED
    assert r.reason == "closed without beta (no update by the deadline)"


def test_close_with_equal_and_capped_weighting() -> None:
    r = make_round()
    r.submit(update("alpha", [1.0], n_samples=100))
    r.submit(update("beta", [0.0], n_samples=300))
    r.submit(update("gamma", [0.0], n_samples=600))
    mean = r.close(now=0.0, weighting=Weighting.EQUAL)
    assert mean is not None
    assert mean[0] == pytest.approx(1 / 3)

    r = make_round()
    r.submit(update("alpha", [0.0], n_samples=100))
    r.submit(update("beta", [8.0], n_samples=300))
    r.submit(update("gamma", [0.0], n_samples=600))
    mean = r.close(now=0.0, weighting=Weighting.CAPPED, cap=0.5)
    assert mean is not None
    assert mean[0] == pytest.approx(0.375 * 8.0)  # capped weights [.125, .375, .5]


def test_too_few_at_the_deadline_fails_with_a_reason() -> None:
    r = make_round()
    r.submit(update("alpha", [1.0]))
    assert r.close(now=100.0, weighting=Weighting.SAMPLES) is None
    assert r.status is RoundStatus.FAILED
    assert r.finished
    assert r.reason == ("only 1 of 3 site(s) reported by the deadline; at least 2 needed")


def test_too_few_at_the_deadline_extends_when_configured() -> None:
    r = make_round(extension_s=30.0, extensions_left=2)
    r.submit(update("alpha", [1.0]))

    assert r.close(now=101.0, weighting=Weighting.SAMPLES) is None
    assert r.status is RoundStatus.COLLECTING
    assert r.deadline == 131.0  # now + extension
    assert r.extensions_left == 1
    assert not r.due(now=130.0)
    assert r.due(now=131.0)
    with pytest.raises(RoundError, match=r"round 1 is not due"):
        r.close(now=120.0, weighting=Weighting.SAMPLES)

    assert r.close(now=131.0, weighting=Weighting.SAMPLES) is None
    assert r.deadline == 161.0
    assert r.extensions_left == 0

    assert r.close(now=161.0, weighting=Weighting.SAMPLES) is None
    assert r.status is RoundStatus.FAILED
    assert "only 1 of 3 site(s)" in r.reason


def test_extension_lets_a_late_site_in() -> None:
    r = make_round(extension_s=30.0, extensions_left=1)
    r.submit(update("alpha", [2.0], n_samples=100))
    assert r.close(now=100.0, weighting=Weighting.SAMPLES) is None
    r.submit(update("beta", [0.0], n_samples=100))
    mean = r.close(now=130.0, weighting=Weighting.SAMPLES)
    assert mean is not None
    np.testing.assert_allclose(mean, [1.0])
    assert r.reason == "closed without gamma (no update by the deadline)"


def test_closing_before_due_with_too_few_is_refused() -> None:
    r = make_round()
    r.submit(update("alpha", [1.0]))
    with pytest.raises(RoundError, match=r"round 1 is not due"):
        r.close(now=50.0, weighting=Weighting.SAMPLES)
    assert r.status is RoundStatus.COLLECTING
    assert not r.finished


def test_closing_twice_is_refused() -> None:
    r = make_round()
    r.submit(update("alpha", [1.0]))
    r.submit(update("beta", [1.0]))
    r.close(now=100.0, weighting=Weighting.SAMPLES)
    with pytest.raises(RoundError, match=r"round 1 is already closed"):
        r.close(now=200.0, weighting=Weighting.SAMPLES)


def test_cap_infeasible_for_the_reporters_does_not_wedge_the_round() -> None:
    """BUG (rounds.py, Round.close): with weighting 'capped' and cap 0.4, three selected
    sites and min_sites 2, a round where only two report by the deadline calls
    client_weights(..., cap=0.4) for 2 sites; cap * 2 < 1 raises a plain ValueError
    *after* status was set to AGGREGATING. The round is then neither finished nor
    closable: due() stays True and every close() raises again, so the study stalls.
    Expected: the round ends (closed with feasible weights, or failed with a reason).
    """
    r = make_round()
    r.submit(update("alpha", [1.0], n_samples=100))
    r.submit(update("beta", [0.0], n_samples=300))
    with contextlib.suppress(RoundError):
        r.close(now=100.0, weighting=Weighting.CAPPED, cap=0.4)
    assert r.status in (RoundStatus.CLOSED, RoundStatus.FAILED)


# --- Federation --------------------------------------------------------------------------

STUDY = """
name: rounds-test
schema:
  label: {name: y}
  features:
    - {name: a}
    - {name: b}
aggregation: {weighting: samples, server_learning_rate: 0.5}
rounds: {count: 3, min_sites: 2, deadline_s: 60}
seed: 5
"""


def make_study(**rounds: Any) -> Study:
    study = parse_study(STUDY)
    if rounds:
        spec = study.rounds.model_dump() | rounds
        study = study.replace(rounds=spec)
    return study


def make_federation(study: Study | None = None, sites: list[str] | None = None) -> Federation:
    study = study or make_study()
    return Federation(
        study, sites or ["gamma", "alpha", "beta"], np.array([1.0, 1.0, 1.0], np.float32)
    )


def site_update(fed: Federation, site: str, number: int, delta: list[float], n: int) -> SiteUpdate:
    return update(site, delta, n, round_=number, study_hash=fed.study.content_hash, loss=n / 1000)


def test_open_round_builds_the_round_and_the_task() -> None:
    fed = make_federation()
    assert fed.sites == ["alpha", "beta", "gamma"]
    round_, task = fed.open_round(now=1000.0)
    assert round_.number == 1
    assert round_.selected == ("alpha", "beta", "gamma")
    assert round_.min_sites == 2
    assert round_.deadline == 1060.0
    assert round_.study_hash == fed.study.content_hash
    assert task.header.study_hash == fed.study.content_hash
    assert task.header.round == 1
    assert task.header.seed == derive_seed(5, "round", 1)
    np.testing.assert_array_equal(task.params, [1.0, 1.0, 1.0])
    task.params[0] = 99.0  # the task holds a copy
    np.testing.assert_array_equal(fed.params, [1.0, 1.0, 1.0])


def test_finish_round_applies_the_weighted_mean_delta() -> None:
    fed = make_federation()
    round_, _ = fed.open_round(now=0.0)
    round_.submit(site_update(fed, "alpha", 1, [1.0, 2.0, 3.0], 100))
    round_.submit(site_update(fed, "beta", 1, [-1.0, 0.0, 1.0], 300))
    round_.submit(site_update(fed, "gamma", 1, [0.5, 0.5, 0.5], 600))
    assert round_.due(now=0.0)
    outcome = fed.finish_round(round_, now=0.0)
    # mean delta with weights .1/.3/.6 = [0.1, 0.5, 0.9]; params 1 + 0.5 * mean
    np.testing.assert_allclose(fed.params, [1.05, 1.25, 1.45], rtol=1e-6)
    assert fed.params.dtype == np.float32
    assert fed.round_number == 1
    assert outcome.number == 1
    assert outcome.status is RoundStatus.CLOSED
    assert outcome.participants == ("alpha", "beta", "gamma")
    assert outcome.reason == ""
    assert outcome.mean_loss == pytest.approx((0.1 + 0.3 + 0.6) / 3)

    # round 2: beta misses the deadline
    round_, task = fed.open_round(now=100.0)
    assert round_.number == 2
    np.testing.assert_allclose(task.params, [1.05, 1.25, 1.45], rtol=1e-6)
    round_.submit(site_update(fed, "alpha", 2, [7.0, 0.0, 0.0], 100))
    round_.submit(site_update(fed, "gamma", 2, [0.0, 7.0, 0.0], 600))
    assert not round_.due(now=159.0)
    outcome = fed.finish_round(round_, now=160.0)
    # weights 1/7, 6/7: mean delta [1, 6, 0]; params + 0.5 * that
    np.testing.assert_allclose(fed.params, [1.55, 4.25, 1.45], rtol=1e-6)
    assert outcome.participants == ("alpha", "gamma")
    assert outcome.reason == "closed without beta (no update by the deadline)"
    assert fed.round_number == 2


def test_round_numbers_advance_until_done() -> None:
    fed = make_federation()
    for expected in (1, 2, 3):
        assert not fed.done
        round_, task = fed.open_round(now=0.0)
        assert round_.number == task.header.round == expected
        for site in ("alpha", "beta"):
            round_.submit(site_update(fed, site, expected, [0.0, 0.0, 0.0], 10))
        fed.finish_round(round_, now=60.0)
        assert fed.round_number == expected
    assert fed.done
    with pytest.raises(RoundError, match=r"the study has finished its 3 rounds"):
        fed.open_round(now=0.0)


def test_failed_round_advances_without_changing_the_model() -> None:
    fed = make_federation()
    round_, _ = fed.open_round(now=0.0)
    round_.submit(site_update(fed, "alpha", 1, [5.0, 5.0, 5.0], 10))
    outcome = fed.finish_round(round_, now=60.0)
    assert outcome.status is RoundStatus.FAILED
    assert outcome.reason == "only 1 of 3 site(s) reported by the deadline; at least 2 needed"
    assert outcome.participants == ("alpha",)
    assert outcome.mean_loss == pytest.approx(0.01)
    np.testing.assert_array_equal(fed.params, [1.0, 1.0, 1.0])
    assert fed.round_number == 1
    assert fed.open_round(now=100.0)[0].number == 2


def test_round_with_no_reports_has_no_mean_loss() -> None:
    fed = make_federation()
    round_, _ = fed.open_round(now=0.0)
    outcome = fed.finish_round(round_, now=60.0)
    assert outcome.status is RoundStatus.FAILED
    assert outcome.mean_loss is None
    assert outcome.participants == ()


def test_extended_round_stays_open() -> None:
    fed = make_federation()
    round_, _ = fed.open_round(now=0.0)
    round_.extension_s = 10.0
    round_.extensions_left = 1
    round_.submit(site_update(fed, "alpha", 1, [2.0, 0.0, 0.0], 100))
    outcome = fed.finish_round(round_, now=60.0)
    assert outcome.status is RoundStatus.COLLECTING
    assert fed.round_number == 0
    assert round_.deadline == 70.0
    round_.submit(site_update(fed, "beta", 1, [0.0, 0.0, 0.0], 100))
    outcome = fed.finish_round(round_, now=70.0)
    assert outcome.status is RoundStatus.CLOSED
    assert fed.round_number == 1
    np.testing.assert_allclose(fed.params, [1.5, 1.0, 1.0], rtol=1e-6)  # 1 + 0.5 * 1


def test_finishing_a_round_that_is_not_open_is_refused() -> None:
    fed = make_federation()
    round_, _ = fed.open_round(now=0.0)
    for site in ("alpha", "beta", "gamma"):
        round_.submit(site_update(fed, site, 1, [1.0, 1.0, 1.0], 10))
    fed.finish_round(round_, now=0.0)
    with pytest.raises(RoundError, match=r"round 1 is not the open round"):
        fed.finish_round(round_, now=0.0)
    stray = make_round(study_hash=fed.study.content_hash, number=5)
    with pytest.raises(RoundError, match=r"round 5 is not the open round"):
        fed.finish_round(stray, now=1000.0)
    np.testing.assert_allclose(fed.params, [1.5, 1.5, 1.5])  # stepped once only


def test_finishing_a_round_before_it_is_due_is_refused() -> None:
    fed = make_federation()
    round_, _ = fed.open_round(now=0.0)
    round_.submit(site_update(fed, "alpha", 1, [1.0, 1.0, 1.0], 10))
    with pytest.raises(RoundError, match=r"round 1 is not due"):
        fed.finish_round(round_, now=10.0)
    assert fed.round_number == 0


def test_too_few_sites_for_min_sites_is_refused() -> None:
    with pytest.raises(ValueError, match=r"the study needs at least 2 site\(s\), 1 joined"):
        make_federation(sites=["alpha"])


def test_duplicate_site_names_are_refused() -> None:
    with pytest.raises(ValueError, match=r"site names must be unique"):
        make_federation(sites=["alpha", "beta", "alpha"])


SIX = ["s1", "s2", "s3", "s4", "s5", "s6"]


def test_selection_with_fraction_is_deterministic_for_a_seed() -> None:
    study = make_study(fraction=0.5)
    one = make_federation(study, SIX)
    two = make_federation(study, list(reversed(SIX)))
    picks = [one.select(n) for n in range(1, 11)]
    assert picks == [two.select(n) for n in range(1, 11)]
    for pick in picks:
        assert len(pick) == 3  # round(0.5 * 6)
        assert len(set(pick)) == 3
        assert set(pick) <= set(SIX)
        assert list(pick) == sorted(pick)
    assert len(set(picks)) > 1  # rounds draw different subsets

    other_seed = make_federation(study.replace(seed=6), SIX)
    assert [other_seed.select(n) for n in range(1, 11)] != picks


def test_selection_respects_min_sites() -> None:
    study = make_study(fraction=0.1, min_sites=3)
    fed = make_federation(study, SIX)
    for n in range(1, 8):
        assert len(fed.select(n)) == 3  # round(0.6) = 1, raised to min_sites
    round_, _ = fed.open_round(now=0.0)
    assert len(round_.selected) == 3
    assert round_.min_sites == 3


def test_full_fraction_selects_everyone() -> None:
    fed = make_federation(make_study(fraction=1.0), SIX)
    assert fed.select(1) == tuple(SIX)


def test_derive_seed_is_stable_and_63_bit() -> None:
    assert derive_seed(5, "round", 1) == derive_seed(5, "round", 1)
    assert derive_seed(5, "round", 1) != derive_seed(5, "round", 2)
    assert derive_seed(5, "round", 1) != derive_seed(6, "round", 1)
    seeds = [derive_seed("x", i) for i in range(200)]
    assert all(0 <= s < 2**63 for s in seeds)
    assert len(set(seeds)) == 200
