"""Local training, model builders and the flat parameter view."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedcare.models.builders import build_model, initial_parameters
from fedcare.models.params import get_flat, parameter_count, set_flat
from fedcare.study import ModelKind, ModelSpec, OptimizerKind, TrainingSpec, parse_study
from fedcare.training import predict_proba, train_local

from .conftest import TOY_STUDY

LOGISTIC = ModelSpec()
MLP = ModelSpec(kind=ModelKind.MLP, hidden=(8, 4))


def toy_data(n: int = 40, d: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Linearly separable: y = 1 exactly when x0 + x1 > 0."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.float32)
    return x, y


def bce(spec: ModelSpec, params: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(predict_proba(spec, params, x), 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


@pytest.fixture
def count_sgd_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts real optimizer.step() calls, independently of what train_local reports."""
    from fedcare.training.sgd import SGD

    calls: list[int] = []
    original = SGD.step

    def counting(self: SGD) -> None:
        calls.append(1)
        original(self)

    monkeypatch.setattr(SGD, "step", counting)
    return calls


# --- determinism -------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [LOGISTIC, MLP], ids=["logistic", "mlp"])
@pytest.mark.parametrize("optimizer", [OptimizerKind.SGD, OptimizerKind.ADAM])
def test_train_local_is_deterministic_for_a_seed(spec: ModelSpec, optimizer: OptimizerKind) -> None:
    x, y = toy_data()
    training = TrainingSpec(epochs=2, batch_size=8, optimizer=optimizer, learning_rate=0.05)
    start = initial_parameters(spec, (5,), seed=1)
    a = train_local(spec, training, start, x, y, seed=7)
    torch.manual_seed(12345)  # the global RNG must not matter
    b = train_local(spec, training, start, x, y, seed=7)
    assert a.params.tobytes() == b.params.tobytes()
    assert a.loss == b.loss
    c = train_local(spec, training, start, x, y, seed=8)
    assert not np.array_equal(a.params, c.params)  # another shuffle, other params


def test_train_local_with_dropout_is_deterministic_for_a_seed() -> None:
    """BUG (training/local.py, train_local): only the batch order is drawn from the seeded
    generator; nn.Dropout draws its masks from torch's *global* RNG, so with dropout > 0
    the same seed gives different parameters on each call (and the result depends on
    whatever else used the global RNG). Fix: run the loop inside
    ``torch.random.fork_rng()`` after ``torch.manual_seed(seed)``.
    """
    spec = ModelSpec(kind=ModelKind.MLP, hidden=(8, 4), dropout=0.5)
    x, y = toy_data()
    training = TrainingSpec(epochs=2, batch_size=8)
    start = initial_parameters(spec, (5,), seed=1)
    torch.manual_seed(1)
    a = train_local(spec, training, start, x, y, seed=7)
    torch.manual_seed(2)
    b = train_local(spec, training, start, x, y, seed=7)
    assert a.params.tobytes() == b.params.tobytes()


def test_train_local_does_not_modify_its_inputs() -> None:
    x, y = toy_data()
    start = initial_parameters(MLP, (5,), seed=1)
    copies = (start.copy(), x.copy(), y.copy())
    train_local(MLP, TrainingSpec(epochs=1, batch_size=8), start, x, y, seed=1)
    for before, after in zip(copies, (start, x, y), strict=True):
        assert before.tobytes() == after.tobytes()


# --- how many steps ----------------------------------------------------------------------


@pytest.mark.parametrize(("n", "steps"), [(20, 1), (20, 7), (5, 12)])
def test_steps_mode_runs_exactly_that_many_steps(
    n: int, steps: int, count_sgd_steps: list[int]
) -> None:
    x, y = toy_data(n=n)
    training = TrainingSpec(steps=steps, batch_size=8)
    assert training.epochs is None
    result = train_local(LOGISTIC, training, np.zeros(6, np.float32), x, y, seed=0)
    assert result.steps == steps
    assert len(count_sgd_steps) == steps
    assert result.n_samples == n


@pytest.mark.parametrize(
    ("n", "batch", "epochs", "expected"),
    [(20, 8, 4, 12), (16, 8, 3, 6), (5, 64, 2, 2), (17, 4, 1, 5)],
)
def test_epochs_mode_runs_ceil_n_over_batch_steps_per_epoch(
    n: int, batch: int, epochs: int, expected: int, count_sgd_steps: list[int]
) -> None:
    assert expected == math.ceil(n / batch) * epochs
    x, y = toy_data(n=n)
    training = TrainingSpec(epochs=epochs, batch_size=batch)
    result = train_local(LOGISTIC, training, np.zeros(6, np.float32), x, y, seed=0)
    assert result.steps == expected
    assert len(count_sgd_steps) == expected


def test_steps_and_epochs_together_are_refused() -> None:
    with pytest.raises(ValueError, match=r"give either epochs or steps, not both"):
        TrainingSpec(epochs=2, steps=5)


# --- what training does ------------------------------------------------------------------


def test_one_full_batch_sgd_step_by_hand() -> None:
    # zero start: p = 0.5 everywhere; dL/dw = mean((0.5 - y) x), dL/db = mean(0.5 - y)
    x = np.array([[1, 0], [0, 2], [2, 1], [1, 0]], np.float32)
    y = np.array([1, 0, 1, 0], np.float32)
    # grad w0 = mean(-0.5, 0, -1, 0.5) = -0.25; w1 = mean(0, 1, -0.5, 0) = 0.125; b = 0
    training = TrainingSpec(steps=1, batch_size=4, learning_rate=0.1)
    result = train_local(LOGISTIC, training, np.zeros(3, np.float32), x, y, seed=0)
    np.testing.assert_allclose(result.params, [0.025, -0.0125, 0.0], atol=1e-7)
    assert result.loss == pytest.approx(math.log(2), rel=1e-6)
    assert result.steps == 1
    assert result.n_samples == 4


def test_loss_decreases_on_a_separable_problem() -> None:
    x, y = toy_data(n=64, d=2, seed=3)
    training = TrainingSpec(epochs=1, batch_size=16, learning_rate=0.5)
    params = initial_parameters(LOGISTIC, (2,), seed=0)
    full_losses = [bce(LOGISTIC, params, x, y)]
    epoch_losses = []
    for epoch in range(6):
        result = train_local(LOGISTIC, training, params, x, y, seed=epoch)
        params = result.params
        full_losses.append(bce(LOGISTIC, params, x, y))
        epoch_losses.append(result.loss)
    assert full_losses[0] == pytest.approx(math.log(2), rel=1e-6)
    assert full_losses[-1] < 0.5 * full_losses[0]
    assert full_losses[-1] < full_losses[1]
    assert epoch_losses[-1] < epoch_losses[0]
    # the model has learnt the rule: both weights positive, accuracy high
    assert params[0] > 0
    assert params[1] > 0
    accuracy = np.mean((predict_proba(LOGISTIC, params, x) > 0.5) == (y == 1))
    assert accuracy >= 0.95


def test_huge_learning_rate_raises_floating_point_error() -> None:
    x, y = toy_data()
    training = TrainingSpec(epochs=3, batch_size=8, learning_rate=1e38)
    with pytest.raises(FloatingPointError, match=r"diverged.*lower the learning rate"):
        train_local(LOGISTIC, training, np.zeros(6, np.float32), x * 100, y, seed=1)


def test_train_local_refuses_bad_inputs() -> None:
    x, y = toy_data(n=4)
    training = TrainingSpec()
    with pytest.raises(ValueError, match=r"cannot train on zero rows"):
        train_local(LOGISTIC, training, np.zeros(6, np.float32), x[:0], y[:0], seed=0)
    with pytest.raises(ValueError, match=r"labels have shape \(3,\), expected \(4,\)"):
        train_local(LOGISTIC, training, np.zeros(6, np.float32), x, y[:3], seed=0)
    with pytest.raises(ValueError, match=r"the model needs \(6,\)"):
        train_local(LOGISTIC, training, np.zeros(7, np.float32), x, y, seed=0)


# --- builders ----------------------------------------------------------------------------


def test_mlp_parameter_count() -> None:
    model = build_model(MLP, (5,))
    assert parameter_count(model) == (5 * 8 + 8) + (8 * 4 + 4) + (4 + 1)  # 89
    assert initial_parameters(MLP, (5,), seed=0).shape == (89,)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(5, 8), (8, 4), (4, 1)]


def test_logistic_regression_is_one_linear_layer() -> None:
    model = build_model(LOGISTIC, (5,))
    assert isinstance(model, nn.Linear)
    assert parameter_count(model) == 6


def test_dropout_layers_are_added_only_when_asked() -> None:
    plain = build_model(MLP, (5,))
    dropped = build_model(ModelSpec(kind=ModelKind.MLP, hidden=(8, 4), dropout=0.25), (5,))
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    dropouts = [m for m in dropped.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 2
    assert all(m.p == 0.25 for m in dropouts)
    assert parameter_count(dropped) == 89


def test_build_model_needs_an_input() -> None:
    with pytest.raises(ValueError, match=r"a model needs at least one input, got shape \(0,\)"):
        build_model(LOGISTIC, (0,))


def test_logistic_regression_starts_at_zero() -> None:
    for seed in (0, 1, 99):
        params = initial_parameters(LOGISTIC, (5,), seed=seed)
        assert params.dtype == np.float32
        np.testing.assert_array_equal(params, np.zeros(6, np.float32))


def test_mlp_initial_parameters_depend_only_on_the_seed() -> None:
    a = initial_parameters(MLP, (5,), seed=3)
    torch.manual_seed(999)
    b = initial_parameters(MLP, (5,), seed=3)
    c = initial_parameters(MLP, (5,), seed=4)
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, c)
    assert np.all(np.isfinite(a))
    assert np.any(a != 0)


def test_initial_parameters_leave_the_global_rng_alone() -> None:
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    initial_parameters(MLP, (5,), seed=7)
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())


# --- flat parameters ---------------------------------------------------------------------


def test_get_flat_set_flat_round_trip() -> None:
    model = build_model(MLP, (5,))
    vector = np.random.default_rng(0).normal(size=89).astype(np.float32)
    set_flat(model, vector)
    out = get_flat(model)
    assert out.dtype == np.float32
    assert out.tobytes() == vector.tobytes()
    # order: first layer's weight (8 x 5, row-major), then its bias, and so on
    first = model[0]
    assert isinstance(first, nn.Linear)
    np.testing.assert_array_equal(first.weight.detach().numpy().reshape(-1), vector[:40])
    np.testing.assert_array_equal(first.bias.detach().numpy(), vector[40:48])


def test_get_flat_is_a_copy() -> None:
    model = build_model(LOGISTIC, (2,))
    set_flat(model, np.array([1.0, 2.0, 3.0], np.float32))
    flat = get_flat(model)
    flat[0] = 100.0
    assert get_flat(model)[0] == 1.0


def test_set_flat_refuses_the_wrong_length() -> None:
    model = build_model(LOGISTIC, (5,))
    before = get_flat(model)
    with pytest.raises(
        ValueError, match=r"parameter vector has shape \(5,\), the model needs \(6,\)"
    ):
        set_flat(model, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=r"shape \(7,\), the model needs \(6,\)"):
        set_flat(model, np.zeros(7, np.float32))
    with pytest.raises(ValueError, match=r"shape \(2, 3\), the model needs \(6,\)"):
        set_flat(model, np.zeros((2, 3), np.float32))
    assert get_flat(model).tobytes() == before.tobytes()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_set_flat_refuses_non_finite_values(bad: float) -> None:
    model = build_model(LOGISTIC, (5,))
    before = get_flat(model)
    vector = np.ones(6, np.float32)
    vector[3] = bad
    with pytest.raises(ValueError, match=r"parameter vector contains NaN or infinite values"):
        set_flat(model, vector)
    assert get_flat(model).tobytes() == before.tobytes()  # nothing half-loaded


# --- prediction --------------------------------------------------------------------------


def test_predict_proba_by_hand() -> None:
    params = np.array([1.0, -1.0, 0.5], np.float32)  # w = [1, -1], b = 0.5
    x = np.array([[0, 0], [1, 0], [0, 1], [100, 0], [0, 100]], np.float32)
    p = predict_proba(LOGISTIC, params, x)
    sigmoid = [1 / (1 + math.exp(-z)) for z in (0.5, 1.5, -0.5, 100.5, -99.5)]
    np.testing.assert_allclose(p, sigmoid, rtol=1e-6, atol=1e-30)
    assert p.dtype == np.float64
    assert p.shape == (5,)


def test_predict_proba_at_zero_is_one_half() -> None:
    x, _ = toy_data(n=7)
    np.testing.assert_array_equal(predict_proba(LOGISTIC, np.zeros(6, np.float32), x), [0.5] * 7)


def test_predict_proba_is_a_probability_and_ignores_dropout() -> None:
    spec = ModelSpec(kind=ModelKind.MLP, hidden=(8, 4), dropout=0.5)
    x, _ = toy_data(n=50)
    params = np.random.default_rng(1).normal(scale=3.0, size=89).astype(np.float32)
    p = predict_proba(spec, params, x * 10)
    assert p.shape == (50,)
    assert np.all((p >= 0) & (p <= 1))
    assert np.all(np.isfinite(p))
    np.testing.assert_array_equal(p, predict_proba(spec, params, x * 10))  # eval mode


@pytest.mark.parametrize(
    ("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.0, 0.01), (0.5, 0.001)]
)
def test_fedcare_sgd_matches_torch_optim_sgd_bit_for_bit(
    momentum: float, weight_decay: float
) -> None:
    from fedcare.training.sgd import SGD

    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = (torch.rand(64) > 0.5).float()
    ours = build_model(ModelSpec(kind=ModelKind.MLP, hidden=(8,)), (5,))
    theirs = build_model(ModelSpec(kind=ModelKind.MLP, hidden=(8,)), (5,))
    theirs.load_state_dict(ours.state_dict())
    opt_ours = SGD(ours.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    opt_theirs = torch.optim.SGD(
        theirs.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay, foreach=False
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for step in range(5):
        batch = slice(step * 12, step * 12 + 12)
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            loss_fn(model(x[batch]).squeeze(-1), y[batch]).backward()
            opt.step()
    assert np.array_equal(get_flat(ours), get_flat(theirs))


def test_a_loss_still_falling_at_the_last_round_is_flagged_and_a_flat_one_is_not() -> None:
    from fedcare.training.convergence import still_falling

    falling = [0.9, 0.7, 0.6, 0.55, 0.52, 0.50]
    assert still_falling(falling) == pytest.approx((0.6 - 0.5) / 0.6)
    assert still_falling([0.9, 0.5, 0.401, 0.4005, 0.4002, 0.4]) is None
    assert still_falling([0.5, 0.4, 0.3]) is None  # too few rounds to tell
    assert still_falling([None, None, None, None, None]) is None  # DP: no loss reported


@pytest.mark.parametrize("model", ["{kind: logistic_regression}", "{kind: mlp, hidden: [16, 8]}"])
def test_the_numpy_forward_pass_is_the_torch_modules(model: str) -> None:
    study = parse_study(TOY_STUDY.replace("training:", f"model: {model}\ntraining:"))
    shape = study.feature_schema.input_shape
    rng = np.random.default_rng(4)
    module = build_model(study.model, shape)
    params = rng.normal(0, 1.5, sum(p.numel() for p in module.parameters())).astype(np.float32)
    x = rng.normal(0, 2, (300, *shape)).astype(np.float32)
    set_flat(module, params)
    module.eval()
    with torch.no_grad():
        expected = torch.sigmoid(module(torch.from_numpy(x)).reshape(-1)).double().numpy()
    assert np.abs(predict_proba(study.model, params, x) - expected).max() < 1e-6


def test_the_coordinators_round_zero_model_is_the_in_process_one() -> None:
    """The child process the coordinator asks (it never loads PyTorch itself) gives the
    very vector the simulation starts from."""
    import subprocess
    import sys

    from fedcare.data import demo_study

    study = demo_study()
    done = subprocess.run(
        [sys.executable, "-m", "fedcare.models.initial"],
        input=study.model_dump_json(by_alias=True).encode(),
        capture_output=True,
        timeout=120,
        check=True,
    )
    child = np.frombuffer(done.stdout, dtype="<f4")
    here = initial_parameters(study.model, study.feature_schema.input_shape, study.seed)
    assert child.tobytes() == here.astype("<f4").tobytes()
    assert np.any(child != 0)
