"""Local training batched across a simulation's sites against the per-site reference."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from fedcare.models.builders import initial_parameters
from fedcare.models.size import study_parameter_count
from fedcare.simulation.runner import run_federation
from fedcare.site.dataset import SiteDataset, prepare_site_data
from fedcare.site.worker import SiteWorker
from fedcare.study import ModelSpec, Study, TrainingSpec, parse_study
from fedcare.training import batched as batched_module
from fedcare.training.batched import Job, batchable, shares_rounds, train_many
from fedcare.training.dp_sgd import DpSgdSettings
from fedcare.training.local import LocalResult, train_local

from .conftest import toy_frame, toy_mapping


def study(model: str, training: str, extra: str = "") -> Study:
    return parse_study(f"""
name: batched
schema:
  label: {{name: y}}
  features:
    - {{name: a, reference: [0, 1]}}
    - {{name: b, reference: [0, 1]}}
    - {{name: c, reference: [0, 1], missing: {{rule: value, fill: 0, indicator: true}}}}
model: {model}
training: {training}
preprocessing: {{scaling: reference}}
rounds: {{count: 5, min_sites: 2}}
seed: 11
{extra}""")


def _as_alone(spec: Study, start: NDArray[np.float32], jobs: list[Job]) -> None:
    """Each job's batched result is what training its site alone gives."""
    many = train_many(spec.model, spec.training, start, jobs)
    for job, result in zip(jobs, many, strict=True):
        alone = train_local(
            spec.model, spec.training, start, job.features, job.labels, job.seed, dp=job.dp
        )
        assert result.steps == alone.steps
        assert result.n_samples == alone.n_samples
        assert np.abs(result.params - alone.params).max() < 1e-6
        assert result.loss == pytest.approx(alone.loss, abs=1e-6)


def _four_sites(spec: Study) -> list[SiteDataset]:
    return [
        prepare_site_data(toy_frame(i, 120 + 30 * i, 0.2 * i), toy_mapping(f"s{i}"), spec)
        for i in range(4)
    ]


def _batched_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[Job]]:
    """The jobs of every batched call made from now on."""
    calls: list[list[Job]] = []
    real = batched_module.train_many

    def counted(
        model: ModelSpec, training: TrainingSpec, start: NDArray[np.float32], jobs: list[Job]
    ) -> list[LocalResult]:
        calls.append(list(jobs))
        return real(model, training, start, jobs)

    monkeypatch.setattr(batched_module, "train_many", counted)
    return calls


CASES = [
    ("{kind: logistic_regression}", "{epochs: 1, batch_size: 16, learning_rate: 0.1}"),
    ("{kind: mlp, hidden: [8, 4]}", "{epochs: 2, batch_size: 10, learning_rate: 0.05}"),
    (
        "{kind: mlp, hidden: [6]}",
        "{steps: 7, batch_size: 12, learning_rate: 0.1, momentum: 0.9, weight_decay: 0.01}",
    ),
]


@pytest.mark.parametrize(("model", "training"), CASES)
def test_each_site_gets_what_it_would_train_alone(model: str, training: str) -> None:
    spec = study(model, training)
    rng = np.random.default_rng(1)
    start = initial_parameters(spec.model, spec.feature_schema.input_shape, 5) + np.float32(0.1)
    sizes = [40, 17, 93, 5, 64]  # sites with different numbers of batches
    jobs = [
        Job(
            rng.normal(size=(n, 4)).astype(np.float32),
            (rng.random(n) < 0.4).astype(np.float32),
            seed=100 + i,
        )
        for i, n in enumerate(sizes)
    ]
    _as_alone(spec, start, jobs)


def test_a_simulation_batched_trains_the_per_site_model(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = study("{kind: mlp, hidden: [8]}", "{epochs: 1, batch_size: 16, learning_rate: 0.1}")
    assert shares_rounds(spec)
    sites = _four_sites(spec)
    calls = _batched_calls(monkeypatch)
    batched = run_federation(spec, sites).params
    # One batched call per round, for all four sites: the shared path really ran.
    assert [len(jobs) for jobs in calls] == [4] * spec.rounds.count
    monkeypatch.undo()
    n_params = study_parameter_count(spec)
    alone = {s.name: SiteWorker(spec, s, n_params) for s in sites}
    reference = run_federation(spec, sites, workers=alone).params
    assert np.abs(batched - reference).max() < 1e-6
    assert np.any(batched != initial_parameters(spec.model, spec.feature_schema.input_shape, 11))


@pytest.mark.parametrize(
    ("model", "training", "extra"),
    [
        (
            "{kind: mlp, hidden: [8], dropout: 0.2}",
            "{epochs: 1, batch_size: 16, learning_rate: 0.1}",
            "",
        ),
        (
            "{kind: mlp, hidden: [8]}",
            "{epochs: 1, batch_size: 16, learning_rate: 0.1, optimizer: adam}",
            "",
        ),
        (
            "{kind: mlp, hidden: [8]}",
            "{epochs: 1, batch_size: 16, learning_rate: 0.1, proximal_mu: 0.1}",
            "",
        ),
    ],
)
def test_what_the_batched_path_does_not_do_trains_site_by_site(
    model: str, training: str, extra: str
) -> None:
    assert not batchable(study(model, training, extra))


DP_CASES = [
    ("{kind: logistic_regression}", "{epochs: 1, batch_size: 16, learning_rate: 0.1}"),
    ("{kind: mlp, hidden: [8, 4]}", "{epochs: 1, batch_size: 10, learning_rate: 0.05}"),
    (
        "{kind: mlp, hidden: [6]}",
        "{epochs: 1, batch_size: 12, learning_rate: 0.1, momentum: 0.9, weight_decay: 0.01}",
    ),
]


@pytest.mark.parametrize(("model", "training"), DP_CASES)
def test_dp_sgd_batched_gives_each_site_its_own_dp_sgd(model: str, training: str) -> None:
    spec = study(model, training)
    rng = np.random.default_rng(2)
    start = initial_parameters(spec.model, spec.feature_schema.input_shape, 5) + np.float32(0.1)
    # Different sizes, rates, noise and step counts; site 3's tiny rate gives empty
    # batches (noise only), site 1's clip is small enough that most rows are clipped.
    settings = [
        (40, DpSgdSettings(0.2, 1.1, 1.0, 9, secret_seed=501)),
        (17, DpSgdSettings(0.5, 0.7, 0.05, 4, secret_seed=502)),
        (93, DpSgdSettings(0.1, 1.5, 2.0, 12, secret_seed=503)),
        (5, DpSgdSettings(0.01, 1.0, 1.0, 6, secret_seed=504)),
    ]
    jobs = [
        Job(
            rng.normal(size=(n, 4)).astype(np.float32) * 3,
            (rng.random(n) < 0.4).astype(np.float32),
            seed=100 + i,
            dp=dp,
        )
        for i, (n, dp) in enumerate(settings)
    ]
    _as_alone(spec, start, jobs)
    many = train_many(spec.model, spec.training, start, jobs)
    # Each site really got its own noise: another secret seed moves its parameters.
    other = [Job(j.features, j.labels, j.seed, dp=replace(j.dp, secret_seed=9)) for j in jobs]
    moved = train_many(spec.model, spec.training, start, other)
    assert all(np.abs(a.params - b.params).max() > 1e-3 for a, b in zip(many, moved, strict=True))


def test_a_batched_call_is_all_dp_or_none() -> None:
    spec = study("{kind: logistic_regression}", "{epochs: 1, batch_size: 16, learning_rate: 0.1}")
    start = initial_parameters(spec.model, spec.feature_schema.input_shape, 5)
    x, y = np.zeros((4, 4), dtype=np.float32), np.zeros(4, dtype=np.float32)
    jobs = [Job(x, y, 1, DpSgdSettings(0.5, 1.0, 1.0, 2, secret_seed=3)), Job(x, y, 2)]
    with pytest.raises(ValueError, match="DP-SGD or none"):
        train_many(spec.model, spec.training, start, jobs)


DP_STUDY = "privacy: {dp: true, noise_multiplier: 1.0, delta: 1.0e-5, max_grad_norm: 1.0}"


def test_a_dp_simulation_batched_trains_the_per_site_model(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = study(
        "{kind: mlp, hidden: [8]}", "{epochs: 1, batch_size: 16, learning_rate: 0.1}", DP_STUDY
    )
    assert shares_rounds(spec)
    sites = _four_sites(spec)
    calls = _batched_calls(monkeypatch)
    batched = run_federation(spec, sites, noise_seed=4).params
    assert [len(jobs) for jobs in calls] == [4] * spec.rounds.count
    assert all(job.dp is not None for jobs in calls for job in jobs)
    monkeypatch.undo()
    n_params = study_parameter_count(spec)
    alone = {s.name: SiteWorker(spec, s, n_params, noise_seed=4) for s in sites}
    reference = run_federation(spec, sites, workers=alone).params
    assert np.abs(batched - reference).max() < 1e-6
    # The noise counts: another noise seed gives another model.
    assert np.abs(run_federation(spec, sites, noise_seed=5).params - batched).max() > 1e-3


def test_a_site_with_a_privacy_ledger_trains_on_its_own(tmp_path: Path) -> None:
    spec = study(
        "{kind: logistic_regression}", "{epochs: 1, batch_size: 16, learning_rate: 0.1}", DP_STUDY
    )
    from fedcare.privacy.dp.budget import Budget
    from fedcare.privacy.dp.guard import PrivacyGuard
    from fedcare.privacy.dp.ledger import PrivacyLedger
    from fedcare.training.batched import SharedRound

    shared = SharedRound(spec)
    site = prepare_site_data(toy_frame(0, 100, 0.0), toy_mapping("s0"), spec)
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    guard = PrivacyGuard(ledger, site.name, Budget(10.0, 1e-4))
    worker = SiteWorker(spec, site, study_parameter_count(spec), privacy=guard, shared=shared)
    # The ledger admits a round only when the site is asked, so the site is not in the
    # shared call, which would draw its settings for every site up front.
    assert worker.shared is None
    with pytest.raises(ValueError, match="without DP settings"):
        shared.register("s1", site.x_train, site.y_train)
    ledger.close()
