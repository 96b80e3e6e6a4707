"""Server optimisers against hand-computed steps, their persisted state, and FedProx.

The expected numbers are worked out by hand in the comments (Reddi et al. 2021,
Algorithm 2, without bias correction, v starting at tau^2); the inputs are
chosen so that most square roots come out exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from torch import nn

from fedcare.aggregation.optimizers import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
    make_server_optimizer,
)
from fedcare.simulation.heart_benchmark import DEFAULT_PROXIMAL_MU, FEDPROX, method_study
from fedcare.study import AggregationSpec, ModelSpec, Strategy, Study, TrainingSpec
from fedcare.training import train_local


def vec(*values: float) -> NDArray[np.float32]:
    return np.array(values, dtype=np.float32)


def close(actual: NDArray[np.float32], *expected: float) -> None:
    np.testing.assert_allclose(actual, np.array(expected), rtol=1e-6, atol=1e-7)


def test_fedavg_adds_the_scaled_mean_delta() -> None:
    # x + eta * delta: [1, -2] + 0.5 * [0.5, 0.25]
    close(FedAvg(0.5).step(vec(1.0, -2.0), vec(0.5, 0.25)), 1.25, -1.875)
    # with eta = 1 FedAvg is plain averaging: the mean of the sites' new parameters
    close(FedAvg(1.0).step(vec(1.0, -2.0), vec(0.5, 0.25)), 1.5, -1.75)


def test_fedavgm_two_steps_by_hand() -> None:
    opt = FedAvgM(learning_rate=0.5, momentum=0.9)
    # m1 = d1 = [0.5, -0.25];  x1 = [1, -2] + 0.5 m1 = [1.25, -2.125]
    x1 = opt.step(vec(1.0, -2.0), vec(0.5, -0.25))
    close(x1, 1.25, -2.125)
    # m2 = 0.9 m1 + d2 = [0.45 + 0.1, -0.225 + 0.2] = [0.55, -0.025]
    # x2 = x1 + 0.5 m2 = [1.525, -2.1375]
    x2 = opt.step(x1, vec(0.1, 0.2))
    close(x2, 1.525, -2.1375)
    close(opt.state()["momentum"], 0.55, -0.025)


def test_fedadagrad_two_steps_by_hand() -> None:
    opt = FedAdagrad(learning_rate=0.5, beta1=0.5, beta2=0.99, tau=0.3)
    # v0 = tau^2 = 0.09.  d1 = [0.4, 0]:
    # m1 = 0.5 * 0 + 0.5 d1 = [0.2, 0];  v1 = 0.09 + d1^2 = [0.25, 0.09], sqrt = [0.5, 0.3]
    # x1 = [1, 2] + 0.5 * m1 / (sqrt(v1) + 0.3) = [1 + 0.5 * 0.2 / 0.8, 2] = [1.125, 2]
    x1 = opt.step(vec(1.0, 2.0), vec(0.4, 0.0))
    close(x1, 1.125, 2.0)
    # d2 = [0, 0.4]:  m2 = 0.5 m1 + 0.5 d2 = [0.1, 0.2];  v2 = v1 + d2^2 = [0.25, 0.25]
    # x2 = x1 + 0.5 * m2 / (0.5 + 0.3) = [1.125 + 0.0625, 2 + 0.125]
    x2 = opt.step(x1, vec(0.0, 0.4))
    close(x2, 1.1875, 2.125)
    close(opt.state()["m"], 0.1, 0.2)
    close(opt.state()["v"], 0.25, 0.25)


def test_fedadam_two_steps_by_hand() -> None:
    opt = FedAdam(learning_rate=0.2, beta1=0.5, beta2=0.5, tau=0.1)
    # v0 = 0.01.  d1 = [0.7, 0.1]:
    # m1 = 0.5 d1 = [0.35, 0.05]
    # v1 = 0.5 * 0.01 + 0.5 * [0.49, 0.01] = [0.25, 0.01], sqrt = [0.5, 0.1]
    # x1 = 0 + 0.2 * m1 / (sqrt(v1) + 0.1) = [0.2 * 0.35 / 0.6, 0.2 * 0.05 / 0.2]
    x1 = opt.step(vec(0.0, 0.0), vec(0.7, 0.1))
    close(x1, 0.07 / 0.6, 0.05)
    # d2 = [0.5, -0.7]:  m2 = 0.5 m1 + 0.5 d2 = [0.425, -0.325]
    # v2 = 0.5 v1 + 0.5 d2^2 = [0.125 + 0.125, 0.005 + 0.245] = [0.25, 0.25], sqrt 0.5
    # x2 = x1 + 0.2 * m2 / 0.6
    x2 = opt.step(x1, vec(0.5, -0.7))
    close(x2, 0.07 / 0.6 + 0.085 / 0.6, 0.05 - 0.065 / 0.6)
    close(opt.state()["v"], 0.25, 0.25)


def test_fedyogi_two_steps_by_hand() -> None:
    # Powers of two throughout, so that v == d^2 (sign 0) is exact in float32.
    opt = FedYogi(learning_rate=0.25, beta1=0.5, beta2=0.5, tau=0.25)
    # v0 = 0.0625.  d1 = [1, 0.25];  v <- v - (1 - b2) d^2 sign(v - d^2):
    # v1 = [0.0625 + 0.5 * 1 (v < d^2), 0.0625 - 0 (v = d^2)] = [0.5625, 0.0625]
    # m1 = 0.5 d1 = [0.5, 0.125]
    # x1 = 0.25 * m1 / (sqrt(v1) + 0.25) = [0.25 * 0.5 / 1, 0.25 * 0.125 / 0.5]
    x1 = opt.step(vec(0.0, 0.0), vec(1.0, 0.25))
    close(x1, 0.125, 0.0625)
    close(opt.state()["v"], 0.5625, 0.0625)
    # d2 = [1.5, 0.125]:
    # v2 = [0.5625 + 0.5 * 2.25 (v < d^2), 0.0625 - 0.5 * 0.015625 (v > d^2)]
    #    = [1.6875, 0.0546875]
    # m2 = 0.5 m1 + 0.5 d2 = [1, 0.125]
    x2 = opt.step(x1, vec(1.5, 0.125))
    close(opt.state()["v"], 1.6875, 0.0546875)
    close(
        x2,
        0.125 + 0.25 * 1.0 / (math.sqrt(1.6875) + 0.25),
        0.0625 + 0.25 * 0.125 / (math.sqrt(0.0546875) + 0.25),
    )


def test_yogi_and_adam_differ_where_the_second_moment_shrinks() -> None:
    """Adam's v decays multiplicatively; Yogi's moves additively, by (1 - b2) d^2 at most."""
    adam = FedAdam(0.2, 0.5, 0.5, 0.1)
    yogi = FedYogi(0.2, 0.5, 0.5, 0.1)
    for opt in (adam, yogi):
        opt.step(vec(0.0), vec(1.0))
        opt.step(vec(0.0), vec(0.0))
    # Adam: v1 = 0.005 + 0.5 = 0.505, v2 = 0.2525.  Yogi: v1 = 0.01 + 0.5 = 0.51, v2 = v1 (d = 0).
    close(adam.state()["v"], 0.2525)
    close(yogi.state()["v"], 0.51)


STATEFUL: dict[str, Callable[[], ServerOptimizer]] = {
    "fedavgm": lambda: FedAvgM(0.3, 0.9),
    "fedadagrad": lambda: FedAdagrad(0.1, 0.9, 0.99, 1e-3),
    "fedadam": lambda: FedAdam(0.1, 0.9, 0.99, 1e-3),
    "fedyogi": lambda: FedYogi(0.1, 0.9, 0.99, 1e-3),
}


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_state_round_trips_and_a_restored_optimiser_continues(name: str) -> None:
    rng = np.random.default_rng(7)
    x0, d1, d2, d3 = (rng.normal(size=20).astype(np.float32) for _ in range(4))
    running = STATEFUL[name]()
    x1 = running.step(x0, d1)
    saved = running.state()
    restored = STATEFUL[name]()
    restored.load_state(saved)
    for key, value in restored.state().items():
        np.testing.assert_array_equal(value, saved[key])
    again = STATEFUL[name]()
    again.load_state(saved)
    expected = running.step(x1, d2)
    continued = restored.step(x1, d2)
    # Two optimisers restored from the same state continue bitwise identically...
    np.testing.assert_array_equal(again.step(x1, d2), continued)
    # ... and follow the uninterrupted one: the state is stored as float32 while the
    # optimiser computes in float64, so they can differ in the last float32 bit.
    np.testing.assert_allclose(continued, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(restored.step(continued, d3), running.step(expected, d3), rtol=1e-6)


def test_fresh_state_is_empty_and_wrong_state_is_refused() -> None:
    assert FedAvg().state() == {}
    with pytest.raises(ValueError, match="no state"):
        FedAvg().load_state({"m": vec(1.0)})
    with pytest.raises(ValueError, match="expected state"):
        FedAdam(0.1, 0.9, 0.99, 1e-3).load_state({"momentum": vec(1.0)})


@pytest.mark.parametrize(
    ("strategy", "kind"),
    [
        (Strategy.FEDAVG, FedAvg),
        (Strategy.FEDAVGM, FedAvgM),
        (Strategy.FEDADAGRAD, FedAdagrad),
        (Strategy.FEDADAM, FedAdam),
        (Strategy.FEDYOGI, FedYogi),
    ],
)
def test_the_study_picks_the_optimiser_and_its_default_rate(
    strategy: Strategy, kind: type[FedAvg | FedAvgM | FedAdagrad | FedAdam | FedYogi]
) -> None:
    spec = AggregationSpec(strategy=strategy)
    opt = make_server_optimizer(spec)
    assert isinstance(opt, kind)
    assert opt.learning_rate == spec.effective_learning_rate


# --- FedProx: the proximal term in local training ---------------------------------


def _problem() -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    y = (x @ np.array([2.0, -1.0, 0.5, 1.0]) + rng.logistic(size=120) > 0).astype(np.float32)
    start = rng.normal(scale=0.1, size=5).astype(np.float32)
    return x, y, start


def _train(mu: float | None) -> NDArray[np.float32]:
    x, y, start = _problem()
    spec = TrainingSpec(epochs=3, batch_size=16, learning_rate=0.1)
    if mu is not None:
        spec = spec.model_copy(update={"proximal_mu": mu})
    return train_local(ModelSpec(), spec, start, x, y, seed=5).params


def test_fedprox_keeps_local_parameters_near_the_global_model() -> None:
    _, _, start = _problem()
    free = np.linalg.norm(_train(0.0) - start)
    held = np.linalg.norm(_train(5.0) - start)
    assert held < 0.5 * free


def test_fedprox_with_mu_zero_is_plain_training_bitwise() -> None:
    np.testing.assert_array_equal(_train(0.0), _train(None))


def test_fedprox_with_mu_zero_equals_a_plain_torch_loop() -> None:
    """The reference: the same batches through a bare SGD loop with no proximal code at all."""
    x, y, start = _problem()
    model = nn.Linear(4, 1)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(start[:4]).reshape(1, 4))
        model.bias.copy_(torch.from_numpy(start[4:]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(5)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(3):
        for index in torch.split(torch.randperm(120, generator=generator), 16):
            optimizer.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(
                model(xt[index]).squeeze(-1), yt[index]
            )
            torch.autograd.backward(loss)
            optimizer.step()
    plain = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()]).numpy()
    np.testing.assert_array_equal(_train(0.0), plain)


def test_fedprox_in_the_benchmark_is_fedavg_plus_mu(heart_study: Study) -> None:
    study = method_study(heart_study, FEDPROX)
    assert study.aggregation.strategy is Strategy.FEDAVG
    assert study.training.proximal_mu == DEFAULT_PROXIMAL_MU > 0
    assert method_study(heart_study, "fedavg").training.proximal_mu == 0.0


@pytest.fixture
def heart_study() -> Study:
    from fedcare.data.heart_disease import heart_disease_study

    return heart_disease_study()
