from __future__ import annotations

import statistics

import numpy as np
import pytest

from fedcare.ids import derive_seed
from fedcare.models.builders import initial_parameters
from fedcare.simulation.runner import (
    FEDERATED,
    POOLED,
    SimulationOptions,
    compare,
    run_simulation,
)
from fedcare.site.dataset import SiteDataset
from fedcare.site.worker import SiteWorker
from fedcare.study import Study
from fedcare.training import train_local
from fedcare.validation.metrics import BinaryMetrics, binary_metrics


def test_seeded_simulation_is_deterministic(toy_study: Study, toy_sites: list[SiteDataset]) -> None:
    first = run_simulation(toy_study, toy_sites)
    second = run_simulation(toy_study, toy_sites)
    assert first.model_dump(exclude={"wall_s"}) == second.model_dump(exclude={"wall_s"})


def test_other_seed_gives_another_model(toy_study: Study, toy_sites: list[SiteDataset]) -> None:
    first = run_simulation(toy_study, toy_sites, SimulationOptions(baselines=False))
    other = run_simulation(
        toy_study.replace(seed=12), toy_sites, SimulationOptions(baselines=False)
    )
    assert first.matrix[FEDERATED] != other.matrix[FEDERATED]


def test_one_round_equals_hand_computed_fedavg(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    """One round of the federation equals local training at each site, sample-weighted."""
    study = toy_study.replace(rounds={"count": 1, "min_sites": 2})
    n_inputs = study.feature_schema.n_inputs
    start = initial_parameters(study.model, (n_inputs,), study.seed)
    round_seed = derive_seed(study.seed, "round", 1)
    local = [
        train_local(
            study.model,
            study.training,
            start,
            s.x_train,
            s.y_train,
            seed=derive_seed(round_seed, s.name),
        )
        for s in toy_sites
    ]
    n = np.array([r.n_samples for r in local], dtype=np.float64)
    expected = (n / n.sum()) @ np.stack([r.params for r in local]).astype(np.float64)

    captured: dict[str, np.ndarray] = {}
    from fedcare.simulation import runner

    def capture(
        study_: Study, params: np.ndarray, sites: list[SiteDataset], n_bootstrap: int = 0
    ) -> dict:
        del n_bootstrap
        captured["params"] = params.copy()
        return {
            s.name: binary_metrics(s.y_test, runner.predict_proba(study_.model, params, s.x_test))
            for s in sites
        }

    original = runner.evaluate
    runner.evaluate = capture  # type: ignore[assignment]
    try:
        runner.run_simulation(study, toy_sites, SimulationOptions(baselines=False))
    finally:
        runner.evaluate = original
    np.testing.assert_allclose(captured["params"], expected, rtol=1e-5, atol=1e-6)


def test_offline_site_round_closes_with_the_others(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    options = SimulationOptions(baselines=False, offline=frozenset({"gamma"}))
    result = run_simulation(toy_study, toy_sites, options)
    assert all(r.status == "closed" for r in result.rounds)
    assert all(r.participants == ["alpha", "beta"] for r in result.rounds)
    assert "gamma" in result.rounds[0].reason


def test_too_few_sites_fail_rounds_cleanly(toy_study: Study, toy_sites: list[SiteDataset]) -> None:
    # As over the network, the first round waits for min_sites sites to ask for work.
    options = SimulationOptions(baselines=False, offline=frozenset({"beta", "gamma"}))
    result = run_simulation(toy_study, toy_sites, options)
    assert result.rounds == []
    assert any("only 1 site(s) answered" in w for w in result.warnings)
    # The model never moved from its zero start: every prediction is 0.5.
    assert result.matrix[FEDERATED]["alpha"].brier == pytest.approx(0.25)


def test_baselines_and_comparison(toy_study: Study, toy_sites: list[SiteDataset]) -> None:
    result = run_simulation(toy_study, toy_sites)
    assert set(result.matrix) == {FEDERATED, POOLED, "local:alpha", "local:beta", "local:gamma"}
    assert [row.site for row in result.comparison] == ["alpha", "beta", "gamma"]
    row = result.comparison[0]
    assert row.local == result.matrix["local:alpha"]["alpha"].auroc
    others = [result.matrix["local:alpha"][s].auroc for s in ("beta", "gamma")]
    assert row.local_on_other_sites == pytest.approx(np.mean(others))
    assert len(result.rounds) == toy_study.rounds.count
    assert all(set(r.metrics) == {"alpha", "beta", "gamma"} for r in result.rounds)
    # The toy task is learnable: the federated model beats chance everywhere.
    assert all((m.auroc or 0) > 0.7 for m in result.matrix[FEDERATED].values())


def test_site_refuses_a_task_for_another_study(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    from fedcare.federation.engine import Federation
    from fedcare.federation.messages import encode_task
    from fedcare.federation.rounds import RoundError

    other = toy_study.replace(seed=99)
    n_params = toy_study.feature_schema.n_inputs + 1
    federation = Federation(other, [s.name for s in toy_sites], np.zeros(n_params, np.float32))
    _, task = federation.open_round(now=0.0)
    worker = SiteWorker(toy_study, toy_sites[0], n_params)
    with pytest.raises(RoundError, match="refuses a task for study"):
        worker.handle(encode_task(task))


def test_an_under_trained_run_says_so_and_a_settled_one_does_not(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    from fedcare.simulation.runner import SimulationOptions, run_simulation

    slow = toy_study.replace(
        rounds={"count": 4, "min_sites": 2},
        training={"epochs": 1, "batch_size": 16, "learning_rate": 0.005},
    )
    result = run_simulation(slow, toy_sites, SimulationOptions(baselines=False))
    losses = [r.mean_train_loss for r in result.rounds]
    assert losses[0] is not None
    assert losses[-1] is not None
    assert losses[-1] < losses[0]
    assert any("still fell" in w and "under-trained" in w for w in result.warnings)
    settled = toy_study.replace(rounds={"count": 30, "min_sites": 2})
    result = run_simulation(settled, toy_sites, SimulationOptions(baselines=False))
    assert not any("still fell" in w for w in result.warnings)
    # Every comparison row carries its held-out size and positives.
    for row in result.comparison:
        site = next(s for s in toy_sites if s.name == row.site)
        assert (row.n, row.positives) == (site.n_test, int(site.y_test.sum()))


@pytest.mark.parametrize("hidden", [(), (6,)])
def test_round_metrics_of_all_sites_at_once_equal_each_site_scored_alone(
    toy_study: Study, toy_sites: list[SiteDataset], hidden: tuple[int, ...]
) -> None:
    """The simulation scores every site in one pass; each site's figures are what
    scoring that site alone gives."""
    from fedcare.simulation.runner import evaluate
    from fedcare.study import ModelSpec
    from fedcare.training import predict_proba

    kind = {"kind": "mlp", "hidden": list(hidden)} if hidden else {"kind": "logistic_regression"}
    study = toy_study.model_copy(update={"model": ModelSpec.model_validate(kind)})
    params = initial_parameters(study.model, toy_sites[0].x_train.shape[1:], 3)
    params = params + np.random.default_rng(1).normal(0, 0.5, params.shape).astype(np.float32)
    together = evaluate(study, params, toy_sites)
    assert list(together) == [site.name for site in toy_sites]
    for site in toy_sites:
        alone = binary_metrics(site.y_test, predict_proba(study.model, params, site.x_test))
        got = together[site.name]
        assert (got.n, got.positives) == (alone.n, alone.positives)
        for name in ("auroc", "auprc", "accuracy", "brier"):
            assert getattr(got, name) == pytest.approx(getattr(alone, name), abs=1e-12), name


def test_the_federated_model_on_other_sites_is_their_mean_to_the_last_bit() -> None:
    # A thousand sites once summed the others again for each site (a million terms);
    # the exact total less each site's own must give fmean's answer, bit for bit.
    rng = np.random.default_rng(3)
    names = [f"s{i}" for i in range(300)]
    aurocs: list[float | None] = [float(v) for v in rng.uniform(0.4, 1.0, len(names))]
    aurocs[7] = aurocs[100] = None  # undefined on a single-class site
    aurocs[5] = 0.1 + 0.2  # a sum that rounds: 0.30000000000000004
    metrics = {
        name: BinaryMetrics(n=10, positives=3, auroc=a, auprc=None, accuracy=0.5, brier=0.2)
        for name, a in zip(names, aurocs, strict=True)
    }
    rows = compare({FEDERATED: metrics}, names)
    for row in rows:
        others = [metrics[s].auroc for s in names if s != row.site]
        expected = statistics.fmean(a for a in others if a is not None)
        assert row.federated_on_other_sites == expected
    alone = compare({FEDERATED: {"only": metrics["s1"]}}, ["only"])
    assert alone[0].federated_on_other_sites is None
