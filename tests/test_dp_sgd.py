"""DP-SGD: per-sample clipping checked against Opacus, noise scale, Poisson sampling,
secret randomness, the study's privacy section and each site's plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedcare.privacy.dp.accountant import Mechanism, epsilon
from fedcare.privacy.dp.plan import PlanError, plan_site
from fedcare.site.dataset import SiteDataset
from fedcare.study import (
    AccountantKind,
    ModelKind,
    ModelSpec,
    PrivacySpec,
    Study,
    StudyError,
    TrainingSpec,
)
from fedcare.training import train_local
from fedcare.training.dp_sgd import (
    DpSgdSettings,
    GhostClipper,
    UnsupportedModelError,
    clipped_gradient_sum,
    linear_layers,
    noise_rows,
    noisy_mean,
    poisson_batches,
)


def _data(n: int = 200, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 3.0
    y = (x[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).float()
    return x, y


def _opacus_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float):  # type: ignore[no-untyped-def]
    """The reference: Opacus' hook-based per-sample gradients, clipped and summed by hand."""
    from opacus.grad_sample import GradSampleModule

    gsm = GradSampleModule(model, loss_reduction="sum")
    loss = nn.functional.binary_cross_entropy_with_logits(gsm(x).squeeze(-1), y, reduction="sum")
    loss.backward()
    samples = [p.grad_sample for p in gsm.parameters()]
    norms = torch.sqrt(sum(s.reshape(s.shape[0], -1).pow(2).sum(1) for s in samples))
    factor = (c / (norms + 1e-6)).clamp(max=1.0)
    out = [torch.einsum("i,i...->...", factor, s) for s in samples]
    gsm._close()
    return out


@pytest.mark.parametrize(
    "spec",
    [ModelSpec(), ModelSpec(kind=ModelKind.MLP, hidden=(8, 4))],
    ids=["logistic", "mlp"],
)
@pytest.mark.parametrize("clip", [0.05, 1.0, 1e6])
# Opacus' hooks warn that the input needs no gradient: true, and irrelevant here.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_clipped_sums_match_opacus_per_sample_gradients(spec: ModelSpec, clip: float) -> None:
    from fedcare.models.builders import build_model

    x, y = _data()
    torch.manual_seed(1)
    model = build_model(spec, x.shape[1:])
    ours, loss = clipped_gradient_sum(model, x, y, clip)
    reference = _opacus_clipped_sum(model, x, y, clip)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert loss > 0
    if clip == 0.05:
        # Every row is clipped: the sum's norm is at most n * C.
        total = torch.sqrt(sum(g.pow(2).sum() for g in ours))
        assert float(total) <= x.shape[0] * clip + 1e-4


def test_dropout_clipped_sums_match_a_row_by_row_autograd_reference() -> None:
    """With dropout on, against each row's gradient from autograd under the same mask."""
    from fedcare.models.builders import build_model

    x, y = _data(60)
    torch.manual_seed(2)
    model = build_model(ModelSpec(kind=ModelKind.MLP, hidden=(6,), dropout=0.4), x.shape[1:])
    torch.manual_seed(9)
    ours, _ = GhostClipper(model, 0.5)(x, y)
    torch.manual_seed(9)
    keep = torch.empty(x.shape[0], 6).bernoulli_(0.6).div_(0.6)  # the draw GhostClipper makes
    first, _, _, last = list(model)
    params = list(model.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        hidden = torch.relu(first(x[i : i + 1])) * keep[i : i + 1]
        loss = nn.functional.binary_cross_entropy_with_logits(
            last(hidden).squeeze(-1), y[i : i + 1], reduction="sum"
        )
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        for total, g in zip(expected, grads, strict=True):
            total += g * min(1.0, 0.5 / (float(norm) + 1e-6))
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_unclipped_sum_is_the_plain_gradient() -> None:
    x, y = _data()
    model = nn.Linear(x.shape[1], 1)
    ours, _ = clipped_gradient_sum(model, x, y, 1e9)
    loss = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y, reduction="sum")
    plain = torch.autograd.grad(loss, list(model.parameters()))
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_empty_batch_gives_zero_sums() -> None:
    model = nn.Linear(3, 1)
    sums, loss = clipped_gradient_sum(model, torch.zeros(0, 3), torch.zeros(0), 1.0)
    assert all(float(s.abs().sum()) == 0.0 for s in sums)
    assert loss == 0.0


def test_layers_that_mix_rows_are_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="BatchNorm1d"):
        linear_layers(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)))


def test_noise_has_the_calibrated_scale() -> None:
    size = 2000 * 50 + 1000
    rows = list(noise_rows(4, size, 3.0, torch.Generator().manual_seed(3)))
    assert [r.shape for r in rows] == [(size,)] * 4
    assert not torch.equal(rows[0], rows[1])  # independent draws, not one row repeated
    sums = [torch.zeros(2000, 50), torch.zeros(1000)]
    weight, bias = noisy_mean(sums, rows[0], expected_batch=100.0)
    assert (weight.shape, bias.shape) == ((2000, 50), (1000,))
    drawn = torch.cat([weight.reshape(-1), bias])
    expected = 3.0 / 100.0
    assert float(drawn.std()) == pytest.approx(expected, rel=0.02)
    assert abs(float(drawn.mean())) < 5 * expected / size**0.5


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.5])
def test_poisson_batches_take_each_row_independently(rate: float) -> None:
    """The gap-based draw has the statistics of one coin per row and step."""
    n, steps = 400, 500
    batches = poisson_batches(n, rate, steps, torch.Generator().manual_seed(0))
    assert len(batches) == steps
    sizes = np.array([b.shape[0] for b in batches])
    assert sizes.mean() == pytest.approx(n * rate, rel=0.05)
    assert sizes.std() == pytest.approx(np.sqrt(n * rate * (1 - rate)), rel=0.15)
    counts = np.bincount(torch.cat(batches).numpy(), minlength=n)
    assert counts.mean() == pytest.approx(steps * rate, rel=0.05)  # every row alike
    assert all(len(set(b.tolist())) == b.shape[0] for b in batches)  # no row twice a step
    assert all(int(b.min()) >= 0 and int(b.max()) < n for b in batches if b.numel())
    assert [b.shape[0] for b in poisson_batches(30, 1.0, 3, torch.Generator())] == [30] * 3


def _train(secret: int, seed: int = 5, sigma: float = 1.0) -> np.ndarray:
    x, y = _data(300)
    settings = DpSgdSettings(
        sampling_rate=0.1, noise_multiplier=sigma, max_grad_norm=1.0, steps=30, secret_seed=secret
    )
    result = train_local(
        ModelSpec(),
        TrainingSpec(learning_rate=0.5),
        np.zeros(x.shape[1] + 1, dtype=np.float32),
        x.numpy(),
        y.numpy(),
        seed=seed,
        dp=settings,
    )
    assert result.steps == 30
    return result.params


def test_the_secret_seed_not_the_round_seed_decides_the_noise() -> None:
    np.testing.assert_array_equal(_train(secret=1), _train(secret=1))
    # Whoever knows the round seed (the coordinator) cannot reproduce the noise.
    assert not np.allclose(_train(secret=1, seed=5), _train(secret=2, seed=5))


def test_dp_training_still_learns_with_moderate_noise() -> None:
    params = _train(secret=7, sigma=0.8)
    x, y = _data(500, seed=9)
    logits = x.numpy() @ params[:-1] + params[-1]
    assert float(((logits > 0) == y.numpy().astype(bool)).mean()) > 0.8


# --- the study's privacy section and the site's plan ------------------------------


def _study(toy_study: Study, **privacy: object) -> Study:
    return toy_study.replace(privacy=privacy)


@pytest.mark.parametrize(
    ("privacy", "message"),
    [
        ({"dp": False, "epsilon": 1.0}, "epsilon given but dp is off"),
        ({"dp": True, "epsilon": 1.0}, "dp needs delta"),
        ({"dp": True, "delta": 1e-5}, "exactly one of epsilon"),
        ({"dp": True, "delta": 1e-5, "epsilon": 1.0, "noise_multiplier": 1.0}, "exactly one"),
        ({"dp": True, "delta": 1e-5, "epsilon": -1.0}, "greater than 0"),
        ({"dp": True, "delta": 1e-5, "epsilon": 1.0, "accountant": "moments"}, "accountant"),
        ({"dp": True, "delta": 1e-5, "epsilon": 1.0, "clip": 1.0}, "clip"),
    ],
)
def test_privacy_section_is_validated_strictly(
    toy_study: Study, privacy: dict[str, object], message: str
) -> None:
    with pytest.raises(StudyError, match=message):
        _study(toy_study, **privacy)


def test_privacy_section_changes_the_hash(toy_study: Study) -> None:
    dp = _study(toy_study, dp=True, epsilon=2.0, delta=1e-5)
    assert dp.content_hash != toy_study.content_hash
    assert dp.privacy == PrivacySpec(dp=True, epsilon=2.0, delta=1e-5)


def test_site_plan_meets_the_target_over_the_whole_study(toy_study: Study) -> None:
    study = _study(toy_study, dp=True, epsilon=2.0, delta=1e-4)
    plan = plan_site(study, 160)
    assert plan.sampling_rate == pytest.approx(16 / 160)
    assert plan.steps_per_round == 10  # one epoch of 160 rows at expected batch 16
    assert plan.rounds == study.rounds.count
    assert plan.study_epsilon <= 2.0
    whole = Mechanism(plan.sampling_rate, plan.noise_multiplier * 0.99, 10 * plan.rounds)
    # The plan's epsilon includes the one noisy record count; a hair less noise breaks it.
    assert epsilon([*plan.count, whole], 1e-4, AccountantKind.RDP) > 2.0


def test_site_plan_refuses_no_dp_and_a_large_delta(toy_study: Study) -> None:
    with pytest.raises(PlanError, match="does not use differential privacy"):
        plan_site(toy_study, 100)
    with pytest.raises(PlanError, match="not below 1 / 100"):
        plan_site(_study(toy_study, dp=True, epsilon=1.0, delta=0.02), 100)


def test_fixed_noise_multiplier_is_used_as_given(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    study = _study(toy_study, dp=True, noise_multiplier=1.3, delta=1e-5)
    plan = plan_site(study, toy_sites[0].n_train)
    assert plan.noise_multiplier == 1.3
