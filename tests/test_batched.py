"""Local training batched across a simulation's sites against the per-site reference."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from fedcare.models.builders import initial_parameters
from fedcare.models.size import study_parameter_count
from fedcare.simulation.runner import run_federation
from fedcare.site.worker import SiteWorker
from fedcare.study import ModelSpec, Study, TrainingSpec, parse_study
from fedcare.training.batched import Job, batchable, shares_rounds, train_many
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
    many = train_many(spec.model, spec.training, start, jobs)
    for job, result in zip(jobs, many, strict=True):
        alone = train_local(spec.model, spec.training, start, job.features, job.labels, job.seed)
        assert result.steps == alone.steps
        assert result.n_samples == alone.n_samples
        assert np.abs(result.params - alone.params).max() < 1e-6
        assert result.loss == pytest.approx(alone.loss, abs=1e-6)


def test_a_simulation_batched_trains_the_per_site_model(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = study("{kind: mlp, hidden: [8]}", "{epochs: 1, batch_size: 16, learning_rate: 0.1}")
    assert shares_rounds(spec)
    from fedcare.site.dataset import prepare_site_data
    from fedcare.training import batched as batched_module

    sites = [
        prepare_site_data(toy_frame(i, 120 + 30 * i, 0.2 * i), toy_mapping(f"s{i}"), spec)
        for i in range(4)
    ]
    calls: list[int] = []
    real = batched_module.train_many

    def counted(
        model: ModelSpec, training: TrainingSpec, start: NDArray[np.float32], jobs: list[Job]
    ) -> list[LocalResult]:
        calls.append(len(jobs))
        return real(model, training, start, jobs)

    monkeypatch.setattr(batched_module, "train_many", counted)
    batched = run_federation(spec, sites).params
    # One batched call per round, for all four sites: the shared path really ran.
    assert calls == [4] * spec.rounds.count
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
        (
            "{kind: mlp, hidden: [8]}",
            "{epochs: 1, batch_size: 16, learning_rate: 0.1}",
            "privacy: {dp: true, noise_multiplier: 1.0, delta: 1.0e-5}",
        ),
    ],
)
def test_what_the_batched_path_does_not_do_trains_site_by_site(
    model: str, training: str, extra: str
) -> None:
    assert not batchable(study(model, training, extra))
