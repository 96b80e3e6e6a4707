"""Issue 21, point 2: one site with a valid certificate cannot break the global model.

The attacks come first: an update at float32's largest value under FedAvg (the
model must never become infinite, and the coordinator must restart on what it
stored), then the same and milder attacks against each robust aggregator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.aggregation.robust import (
    RobustError,
    krum_scores,
    multi_krum,
    norm_bounded_mean,
    robust_aggregate,
    trimmed_mean,
    weighted_median,
)
from fedcare.federation.messages import (
    SiteUpdate,
    UpdateHeader,
    decode_model,
    decode_task,
    encode_update,
)
from fedcare.federation.rounds import RoundStatus
from fedcare.federation.service import StudyService
from fedcare.federation.state.sql import SqlState
from fedcare.fixed_point import QuantizationError, plan_quantization
from fedcare.privacy.secagg.quantize import check_sum_bound
from fedcare.study import RobustSpec, Study, StudyError

NAMES = ["alpha", "beta", "gamma"]
BIG = float(np.finfo(np.float32).max)


# --- the aggregators, as pure functions -----------------------------------------------


def test_weighted_median_is_the_median_and_follows_the_weights() -> None:
    stacked = np.array([[1.0, 10.0], [2.0, 30.0], [3.0, 20.0]])
    equal = np.ones(3)
    np.testing.assert_array_equal(weighted_median(stacked, equal), [2.0, 20.0])
    heavy_first = np.array([5.0, 1.0, 1.0])
    np.testing.assert_array_equal(weighted_median(stacked, heavy_first), [1.0, 10.0])


def test_trimmed_mean_drops_the_extremes_per_coordinate() -> None:
    stacked = np.array([[0.0], [1.0], [2.0], [3.0], [1e30]])
    assert trimmed_mean(stacked, np.ones(5), 0.2)[0] == pytest.approx(2.0)
    assert trimmed_mean(stacked, np.ones(5), 0.0)[0] == pytest.approx(2e29)
    with pytest.raises(RobustError, match="leaves none"):
        trimmed_mean(stacked[:2], np.ones(2), 0.49 + 0.01)


def test_krum_picks_the_clustered_updates() -> None:
    rng = np.random.default_rng(0)
    honest = rng.normal(0.0, 0.01, size=(4, 6))
    stacked = np.vstack([honest, np.full((1, 6), 50.0)])
    scores = krum_scores(stacked, byzantine=1)
    assert int(np.argmax(scores)) == 4
    result = multi_krum(stacked, np.ones(5), byzantine=1, select=None)
    np.testing.assert_allclose(result, honest.mean(axis=0), atol=1e-12)
    with pytest.raises(RobustError, match="needs at least 5"):
        krum_scores(stacked[:4], byzantine=1)


def test_norm_bound_clips_each_update_before_the_mean() -> None:
    stacked = np.array([[3.0, 4.0], [0.0, 1.0], [0.0, 1000.0]])
    result = norm_bounded_mean(stacked, np.ones(3), max_norm=1.0)
    np.testing.assert_allclose(result, [0.2, (0.8 + 1.0 + 1.0) / 3])
    # Default bound: the median norm (5), so only the outlier is scaled.
    default = norm_bounded_mean(stacked, np.ones(3), max_norm=None)
    np.testing.assert_allclose(default, [1.0, (4.0 + 1.0 + 5.0) / 3])


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(5, 9),
    d=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([-1e30, -10.0, 1e6, BIG]),
)
def test_one_bad_update_cannot_move_a_robust_aggregate_far(
    n: int, d: int, seed: int, scale: float
) -> None:
    """With one of n updates arbitrary, median, trimmed mean, Krum and the norm bound
    stay within the honest updates' range; the plain mean does not."""
    rng = np.random.default_rng(seed)
    honest = rng.normal(0.0, 0.1, size=(n - 1, d))
    stacked = np.vstack([honest, np.full((1, d), scale)])
    weights = rng.uniform(0.5, 2.0, size=n)
    reach = float(np.abs(honest).max())
    for spec in (
        RobustSpec(kind="median"),
        RobustSpec(kind="trimmed_mean", beta=0.2),
        RobustSpec(kind="krum", byzantine=1),
        RobustSpec(kind="norm_bound"),
    ):
        result = robust_aggregate(stacked, weights, spec)
        assert np.all(np.isfinite(result))
        assert float(np.abs(result).max()) <= reach * (1 + 1e-6) + 1e-7, spec.kind


def test_robust_options_are_checked() -> None:
    with pytest.raises(ValueError, match="takes no beta"):
        RobustSpec(kind="median", beta=0.1)
    with pytest.raises(ValueError, match=r"less than 0\.5"):
        RobustSpec(kind="trimmed_mean", beta=0.5)


def test_robust_aggregation_is_refused_under_secure_aggregation(toy_study: Study) -> None:
    secure = {"enabled": True, "clip_norm": 1.0, "max_records": 1000}
    with pytest.raises(StudyError, match="secure aggregation hides"):
        toy_study.replace(
            aggregation={"robust": {"kind": "median"}},
            secure_aggregation=secure,
            rounds={"count": 2, "min_sites": 2},
        )


# --- the attack at the coordinator ---------------------------------------------------


def _service(study: Study, tmp_path: Path) -> StudyService:
    state = SqlState(f"sqlite:///{tmp_path / 'c.db'}", tmp_path / "models")
    return StudyService(study, NAMES, state)


def _play(service: StudyService, study: Study, attack: np.ndarray, n_params: int) -> None:
    """One round: alpha and beta send small honest-looking updates, gamma ``attack``."""
    for name in NAMES:
        service.task_for(name)  # the first round opens once min_sites have asked
    tasks = {name: service.task_for(name) for name in NAMES}
    number = tasks["alpha"].round
    assert all(t.round == number for t in tasks.values())
    rng = np.random.default_rng(number)
    for name in NAMES:
        delta = attack if name == "gamma" else rng.normal(0.0, 0.01, n_params)
        task = decode_task(tasks[name].payload, n_params)
        header = UpdateHeader(
            study_hash=study.content_hash,
            round=task.header.round,
            site=name,
            n_samples=1000 if name == "gamma" else 100,
        )
        body = encode_update(SiteUpdate(header, np.asarray(delta, dtype=np.float32)))
        service.submit(name, number, body)


@pytest.mark.parametrize("robust", [None, "median", "trimmed_mean", "norm_bound"])
def test_an_update_at_float32_max_never_makes_the_model_infinite(
    tmp_path: Path, toy_study: Study, robust: str | None
) -> None:
    """The reproduced attack: gamma claims many records with every value at 3.4e38.

    Under FedAvg the model may be pushed far, but a round whose step would not be
    finite fails with the reason and the model does not move; what the coordinator
    stores always loads, so it restarts. A robust aggregator keeps the model where
    the honest sites put it (with equal weights: under sample weighting a site that
    claims most of the records is the weighted median, docs/robust_aggregation.md)."""
    aggregation: dict[str, object] = {}
    if robust is not None:
        options = {"beta": 0.34} if robust == "trimmed_mean" else {}
        aggregation = {"weighting": "equal", "robust": {"kind": robust, **options}}
    study = toy_study.replace(
        rounds={"count": 4, "min_sites": 3, "deadline_s": 60}, aggregation=aggregation
    )
    service = _service(study, tmp_path)
    n = service.n_params
    start = service.federation.params.copy()
    for _ in range(4):
        _play(service, study, np.full(n, BIG), n)
    rounds = service.state.rounds(study.content_hash)
    assert len(rounds) == 4
    params = service.federation.params
    assert np.all(np.isfinite(params))
    if robust is None:
        failed = [r for r in rounds if r.status == RoundStatus.FAILED.value]
        assert failed, "four rounds at float32 max must overflow at least once"
        assert all("not finite" in r.reason for r in failed)
    else:
        assert [r.status for r in rounds] == ["closed"] * 4
        assert float(np.abs(params - start).max()) < 0.5
    service.state.close()
    # The coordinator restarts on what it stored, and the model it serves decodes.
    again = _service(study, tmp_path)
    np.testing.assert_array_equal(again.federation.params, params)
    _, served, _ = decode_model(again.model_bytes(), n)
    np.testing.assert_array_equal(served, params)
    again.state.close()


def test_krum_needs_enough_sites_and_says_so(tmp_path: Path, toy_study: Study) -> None:
    study = toy_study.replace(
        rounds={"count": 1, "min_sites": 3, "deadline_s": 60},
        aggregation={"robust": {"kind": "krum", "byzantine": 1}},
    )
    service = _service(study, tmp_path)
    start = service.federation.params.copy()
    _play(service, study, np.full(service.n_params, BIG), service.n_params)
    (only,) = service.state.rounds(study.content_hash)
    assert only.status == "failed"
    assert "needs at least 5 updates, the round has 3" in only.reason
    np.testing.assert_array_equal(service.federation.params, start)
    service.state.close()


# --- the bound on a secure sum -------------------------------------------------------


def test_a_secure_sum_beyond_what_clipped_inputs_can_reach_is_refused() -> None:
    plan = plan_quantization(32, 1.0, 10)
    honest = np.array([0.6, 0.8, 0.0])  # norm 1: exactly one full-weight clipped input
    check_sum_bound(honest, 1.0, 3, plan)
    check_sum_bound(honest * 2.9, 3.0, 3, plan)
    with pytest.raises(QuantizationError, match="above the"):
        check_sum_bound(honest * 50, 3.0, 3, plan)
    with pytest.raises(QuantizationError, match="weight sum"):
        check_sum_bound(honest, 7.0, 3, plan)
    with pytest.raises(QuantizationError, match="weight sum"):
        check_sum_bound(honest, -1.0, 3, plan)


def test_a_robust_study_round_trips_through_its_canonical_form(toy_study: Study) -> None:
    study = toy_study.replace(aggregation={"robust": {"kind": "krum", "byzantine": 2}})
    again = Study.model_validate(study.canonical())
    assert again.content_hash == study.content_hash
    assert again.aggregation.robust == RobustSpec(kind="krum", byzantine=2)


def test_a_site_masking_an_unclipped_input_fails_the_secure_round(toy_study: Study) -> None:
    """Under secure aggregation the coordinator cannot see an update, but it can see
    that the sum is one no clipped inputs could produce: gamma encodes its delta
    without the clip (as a modified agent would) and the sum is refused."""
    from fedcare.federation.secure_relay import secure_sum
    from fedcare.privacy.secagg.inmemory import make_identities, run_local_round
    from fedcare.privacy.secagg.quantize import encode, quantize_weight
    from fedcare.privacy.secagg.session import round_setup
    from fedcare.privacy.secagg.study import quantization_for

    study = toy_study.replace(
        secure_aggregation={"enabled": True, "clip_norm": 1.0, "max_records": 1000},
        rounds={"count": 2, "min_sites": 2},
    )
    plan = quantization_for(study)
    d = 5
    setup = round_setup(
        study.content_hash,
        1,
        NAMES,
        task_sha256="ab" * 32,
        degree=None,
        threshold_fraction=0.6,
        seed=1,
        bits=plan.bits,
        length=d + 1,
    )
    rng = np.random.default_rng(0)
    honest = {n: encode(rng.normal(0, 0.1, d).astype(np.float32), 0.5, plan, rng) for n in NAMES}
    ids = make_identities(NAMES)
    total, survivors = run_local_round(setup, honest, ids)
    summed = secure_sum(study, total, survivors, {})
    assert np.linalg.norm(summed.weighted_sum) <= summed.weight_sum * plan.clip_norm
    # gamma skips the clip: the quantiser itself clips nothing.
    values = np.full(d + 1, round(10.0 * 0.5 * plan.scale), dtype=np.int64)  # norm 22 > 1
    values[-1] = quantize_weight(0.5, plan)
    forged = values.astype(honest["gamma"].dtype)
    total, survivors = run_local_round(setup, {**honest, "gamma": forged}, ids)
    with pytest.raises(QuantizationError, match="outside its clip bound"):
        secure_sum(study, total, survivors, {})
