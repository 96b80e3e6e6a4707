"""Client weighting, the weighted mean and the FedAvg server step, checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.aggregation import client_weights, make_server_optimizer, weighted_mean
from fedcare.aggregation.optimizers import FedAvg
from fedcare.aggregation.weighting import capped_shares
from fedcare.study import AggregationSpec, Weighting

N = [100, 300, 600]


# --- weights -----------------------------------------------------------------------------


def test_samples_weighting() -> None:
    np.testing.assert_allclose(client_weights(N, Weighting.SAMPLES), [0.1, 0.3, 0.6], rtol=1e-12)


def test_equal_weighting() -> None:
    np.testing.assert_allclose(client_weights(N, Weighting.EQUAL), [1 / 3] * 3, rtol=1e-12)


def test_sqrt_weighting() -> None:
    # sqrt(100), sqrt(300), sqrt(600) = 10, 17.3205, 24.4949; total 51.8154
    roots = np.array([10.0, 17.32050808, 24.49489743])
    expected = roots / roots.sum()
    weights = client_weights(N, Weighting.SQRT)
    np.testing.assert_allclose(weights, expected, rtol=1e-8)
    np.testing.assert_allclose(weights, [0.192993, 0.334273, 0.472733], atol=1e-6)


def test_capped_weighting_pins_the_largest_site() -> None:
    # 600 has 0.6 > 0.5: pinned at 0.5; the remaining 0.5 is split 100:300 = 1:3
    weights = client_weights(N, Weighting.CAPPED, cap=0.5)
    np.testing.assert_allclose(weights, [0.125, 0.375, 0.5], rtol=1e-12)


def test_capped_weighting_cascades() -> None:
    # cap 0.4: 600 pinned at 0.4; remaining 0.6 split 1:3 gives 0.15 / 0.45, so 300 is
    # now over the cap and pinned too; the last 0.2 goes to 100.
    weights = client_weights(N, Weighting.CAPPED, cap=0.4)
    np.testing.assert_allclose(weights, [0.2, 0.4, 0.4], rtol=1e-12)


def test_capped_weighting_cascades_over_three_passes() -> None:
    # [10, 20, 30, 140] / 200 = [.05, .10, .15, .70]; cap 0.3:
    # pass 1: 140 pinned at .3; .7 split 10:20:30 -> [.1167, .2333, .35]
    # pass 2: 30 pinned at .3; .4 split 10:20 -> [.1333, .2667]; nobody over.
    weights = client_weights([10, 20, 30, 140], Weighting.CAPPED, cap=0.3)
    np.testing.assert_allclose(weights, [2 / 15, 4 / 15, 0.3, 0.3], rtol=1e-12)


def test_capped_weighting_below_the_cap_is_plain_samples_weighting() -> None:
    weights = client_weights(N, Weighting.CAPPED, cap=0.6)
    np.testing.assert_allclose(weights, [0.1, 0.3, 0.6], rtol=1e-12)


def test_cap_of_exactly_one_over_n_gives_equal_weights() -> None:
    weights = client_weights(N, Weighting.CAPPED, cap=1 / 3)
    np.testing.assert_allclose(weights, [1 / 3] * 3, rtol=1e-12)
    np.testing.assert_allclose(client_weights([1, 99], Weighting.CAPPED, cap=0.5), [0.5, 0.5])


def test_cap_below_one_over_n_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"a cap of 0\.3 cannot be met by 3 site\(s\): it needs cap >= 1/3"
    ):
        client_weights(N, Weighting.CAPPED, cap=0.3)
    with pytest.raises(ValueError, match=r"cannot be met by 1 site\(s\)"):
        capped_shares(np.array([5.0]), 0.9)


def test_capped_weighting_needs_a_cap() -> None:
    with pytest.raises(ValueError, match=r"capped weighting needs a cap"):
        client_weights(N, Weighting.CAPPED)


@pytest.mark.parametrize("scheme", list(Weighting))
@pytest.mark.parametrize("counts", [[100, 0, 5], [10, -3], [0]])
def test_non_positive_counts_are_refused(scheme: Weighting, counts: list[int]) -> None:
    with pytest.raises(ValueError, match=r"every site must have at least one training record"):
        client_weights(counts, scheme, cap=1.0)


def test_no_sites_is_refused() -> None:
    with pytest.raises(ValueError, match=r"need the sample counts of at least one site"):
        client_weights([], Weighting.SAMPLES)


def test_single_site_gets_everything() -> None:
    for scheme in Weighting:
        np.testing.assert_array_equal(client_weights([42], scheme, cap=1.0), [1.0])


counts_strategy = st.lists(st.integers(min_value=1, max_value=100_000), min_size=1, max_size=12)


@settings(max_examples=80, deadline=None)
@given(counts_strategy, st.sampled_from([Weighting.SAMPLES, Weighting.EQUAL, Weighting.SQRT]))
def test_weights_sum_to_one_and_preserve_order(counts: list[int], scheme: Weighting) -> None:
    weights = client_weights(counts, scheme)
    assert weights.shape == (len(counts),)
    assert math.isclose(weights.sum(), 1.0, rel_tol=0, abs_tol=1e-9)
    assert np.all(weights > 0)
    _assert_order_preserving(counts, weights)


@settings(max_examples=80, deadline=None)
@given(counts_strategy, st.floats(min_value=0.0, max_value=1.0))
def test_capped_weights_sum_to_one_respect_cap_and_preserve_order(
    counts: list[int], share: float
) -> None:
    n = len(counts)
    cap = 1 / n + share * (1 - 1 / n)  # anywhere in [1/n, 1]
    weights = client_weights(counts, Weighting.CAPPED, cap=cap)
    assert math.isclose(weights.sum(), 1.0, rel_tol=0, abs_tol=1e-9)
    assert np.all(weights <= cap + 1e-9)
    assert np.all(weights > 0)
    _assert_order_preserving(counts, weights)
    # a site under the cap keeps its proportional share relative to other such sites
    free = weights < cap - 1e-9
    if free.sum() >= 2:
        ratio = weights[free] / np.asarray(counts, dtype=float)[free]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)


def _assert_order_preserving(counts: list[int], weights: np.ndarray) -> None:
    for i in range(len(counts)):
        for j in range(len(counts)):
            if counts[i] > counts[j]:
                assert weights[i] >= weights[j] - 1e-12
            if counts[i] == counts[j]:
                assert weights[i] == pytest.approx(weights[j], rel=1e-12)


# --- weighted mean -----------------------------------------------------------------------


def test_weighted_mean_with_normalised_weights() -> None:
    vectors = [
        np.array([1.0, 2.0], np.float32),
        np.array([3.0, 4.0], np.float32),
        np.array([5.0, 6.0], np.float32),
    ]
    out = weighted_mean(vectors, np.array([0.2, 0.3, 0.5]))
    # 0.2*1 + 0.3*3 + 0.5*5 = 3.6; 0.2*2 + 0.3*4 + 0.5*6 = 4.6
    np.testing.assert_allclose(out, [3.6, 4.6], rtol=1e-6)
    assert out.dtype == np.float32


def test_weighted_mean_divides_by_the_weight_total() -> None:
    vectors = [
        np.array([0.0, 0.0, -4.0], np.float32),
        np.array([4.0, 8.0, 0.0], np.float32),
        np.array([2.0, 2.0, 2.0], np.float32),
    ]
    out = weighted_mean(vectors, np.array([1.0, 1.0, 2.0]))
    # (0 + 4 + 2*2) / 4 = 2; (0 + 8 + 4) / 4 = 3; (-4 + 0 + 4) / 4 = 0
    np.testing.assert_array_equal(out, np.array([2.0, 3.0, 0.0], np.float32))


def test_weighted_mean_of_one_vector_is_that_vector() -> None:
    v = np.array([1.5, -2.25, 1e-3], np.float32)
    np.testing.assert_array_equal(weighted_mean([v], np.array([0.7])), v)


def test_weighted_mean_with_client_weights() -> None:
    vectors = [np.array([10.0], np.float32), np.array([20.0], np.float32), np.array([0.0])]
    out = weighted_mean(vectors, client_weights(N, Weighting.SAMPLES))  # 1 + 6 + 0
    assert out[0] == pytest.approx(7.0)


def test_weighted_mean_refuses_mismatched_counts() -> None:
    vectors = [np.zeros(2, np.float32)] * 3
    with pytest.raises(ValueError, match=r"3 vectors but 2 weights"):
        weighted_mean(vectors, np.array([0.5, 0.5]))


def test_weighted_mean_refuses_vectors_of_different_lengths() -> None:
    vectors = [np.zeros(2, np.float32), np.zeros(3, np.float32)]
    with pytest.raises(ValueError, match=r"same shape"):
        weighted_mean(vectors, np.array([0.5, 0.5]))


def test_weighted_mean_refuses_no_vectors() -> None:
    with pytest.raises(ValueError, match=r"cannot average zero vectors"):
        weighted_mean([], np.array([]))


@pytest.mark.parametrize("weights", [[0.0, 0.0], [1.0, -1.0], [np.nan, 1.0]])
def test_weighted_mean_refuses_weights_without_positive_total(weights: list[float]) -> None:
    vectors = [np.ones(2, np.float32)] * 2
    with pytest.raises(ValueError, match=r"weights must sum to a positive number"):
        weighted_mean(vectors, np.array(weights))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.floats(min_value=-100, max_value=100, allow_nan=False, width=32),
        min_size=1,
        max_size=8,
    ),
    counts_strategy,
)
def test_weighted_mean_of_equal_vectors_is_that_vector(
    values: list[float], counts: list[int]
) -> None:
    v = np.array(values, np.float32)
    out = weighted_mean([v] * len(counts), client_weights(counts, Weighting.SAMPLES))
    np.testing.assert_allclose(out, v, rtol=1e-6, atol=1e-6)


# --- server step -------------------------------------------------------------------------


def test_fedavg_with_learning_rate_one_is_plain_averaging() -> None:
    params = np.array([1.0, 2.0, 3.0], np.float32)
    delta = np.array([0.5, -1.0, 2.0], np.float32)
    out = FedAvg(1.0).step(params, delta)
    np.testing.assert_array_equal(out, np.array([1.5, 1.0, 5.0], np.float32))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(params, [1.0, 2.0, 3.0])  # input untouched


def test_fedavg_with_learning_rate_half() -> None:
    params = np.array([1.0, 2.0, 3.0], np.float32)
    delta = np.array([0.5, -1.0, 2.0], np.float32)
    out = FedAvg(0.5).step(params, delta)
    np.testing.assert_array_equal(out, np.array([1.25, 1.5, 4.0], np.float32))


def test_make_server_optimizer_uses_the_study_learning_rate() -> None:
    optimizer = make_server_optimizer(AggregationSpec(server_learning_rate=0.5))
    assert isinstance(optimizer, FedAvg)
    out = optimizer.step(np.array([2.0], np.float32), np.array([4.0], np.float32))
    np.testing.assert_array_equal(out, [4.0])  # 2 + 0.5 * 4
    default = make_server_optimizer(AggregationSpec())
    np.testing.assert_array_equal(
        default.step(np.array([2.0], np.float32), np.array([4.0], np.float32)), [6.0]
    )


def test_fedavg_after_weighted_mean_by_hand() -> None:
    params = np.array([1.0, -1.0], np.float32)
    deltas = [
        np.array([1.0, 0.0], np.float32),
        np.array([0.0, 1.0], np.float32),
        np.array([-1.0, 1.0], np.float32),
    ]
    mean = weighted_mean(deltas, client_weights(N, Weighting.CAPPED, cap=0.5))
    # weights [.125, .375, .5]: x = .125 - .5 = -.375; y = .375 + .5 = .875
    np.testing.assert_allclose(mean, [-0.375, 0.875], rtol=1e-6)
    np.testing.assert_allclose(FedAvg(0.5).step(params, mean), [0.8125, -0.5625], rtol=1e-6)
