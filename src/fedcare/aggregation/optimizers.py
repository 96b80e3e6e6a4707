"""Server optimisers: turn the averaged site update into the next global model.

Sites send parameter deltas (new minus global). Following Reddi et al. 2021
("Adaptive Federated Optimization", Algorithm 2), the averaged delta is the
negated pseudo-gradient; with a learning rate of 1, FedAvg is plain parameter
averaging. The adaptive rules are applied without bias correction, as in the
paper, with the second moment starting at tau squared.

Each optimiser exposes its state as named float32 vectors so that a
coordinator can persist it and resume after a restart.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from fedcare.study import AggregationSpec, Strategy

Vector = NDArray[np.float32]


class ServerOptimizer(Protocol):
    """One step of the global model from the round's averaged delta."""

    state_names: tuple[str, ...]

    def step(self, params: Vector, mean_delta: Vector) -> Vector: ...

    def state(self) -> dict[str, Vector]:
        """Named state vectors (empty for stateless optimisers)."""
        ...

    def load_state(self, state: dict[str, Vector]) -> None: ...


def _f32(x: NDArray[np.float64]) -> Vector:
    return x.astype(np.float32)


class FedAvg:
    """x <- x + eta * delta."""

    state_names: tuple[str, ...] = ()

    def __init__(self, learning_rate: float = 1.0) -> None:
        self.learning_rate = learning_rate

    def step(self, params: Vector, mean_delta: Vector) -> Vector:
        return _f32(params + self.learning_rate * mean_delta.astype(np.float64))

    def state(self) -> dict[str, Vector]:
        return {}

    def load_state(self, state: dict[str, Vector]) -> None:
        if state:
            raise ValueError(f"FedAvg has no state, got {sorted(state)}")


class _Stateful:
    """Shared state handling: named moment vectors, created at the first step."""

    state_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._state: dict[str, NDArray[np.float64]] = {}

    def state(self) -> dict[str, Vector]:
        return {name: _f32(value) for name, value in self._state.items()}

    def load_state(self, state: dict[str, Vector]) -> None:
        if state and set(state) != set(self.state_names):
            raise ValueError(f"expected state {sorted(self.state_names)}, got {sorted(state)}")
        self._state = {name: np.asarray(v, dtype=np.float64) for name, v in state.items()}


class FedAvgM(_Stateful):
    """Server momentum: m <- beta m + delta; x <- x + eta m."""

    state_names: tuple[str, ...] = ("momentum",)

    def __init__(self, learning_rate: float, momentum: float) -> None:
        super().__init__()
        self.learning_rate = learning_rate
        self.momentum = momentum

    def step(self, params: Vector, mean_delta: Vector) -> Vector:
        delta = mean_delta.astype(np.float64)
        m = self.momentum * self._state.get("momentum", np.zeros_like(delta)) + delta
        self._state = {"momentum": m}
        return _f32(params + self.learning_rate * m)


class _Adaptive(_Stateful, ABC):
    """m <- b1 m + (1 - b1) delta;  v <- rule(v, delta);  x <- x + eta m / (sqrt(v) + tau)."""

    state_names: tuple[str, ...] = ("m", "v")

    def __init__(self, learning_rate: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__()
        self.learning_rate = learning_rate
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau

    @abstractmethod
    def second_moment(
        self, v: NDArray[np.float64], delta: NDArray[np.float64]
    ) -> NDArray[np.float64]: ...

    def step(self, params: Vector, mean_delta: Vector) -> Vector:
        delta = mean_delta.astype(np.float64)
        m = self._state.get("m", np.zeros_like(delta))
        v = self._state.get("v", np.full_like(delta, self.tau**2))
        m = self.beta1 * m + (1.0 - self.beta1) * delta
        v = self.second_moment(v, delta)
        self._state = {"m": m, "v": v}
        return _f32(params + self.learning_rate * m / (np.sqrt(v) + self.tau))


class FedAdagrad(_Adaptive):
    """v <- v + delta^2."""

    def second_moment(
        self, v: NDArray[np.float64], delta: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        return v + delta**2


class FedAdam(_Adaptive):
    """v <- b2 v + (1 - b2) delta^2."""

    def second_moment(
        self, v: NDArray[np.float64], delta: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        return self.beta2 * v + (1.0 - self.beta2) * delta**2


class FedYogi(_Adaptive):
    """v <- v - (1 - b2) delta^2 sign(v - delta^2): v moves towards delta^2 additively."""

    def second_moment(
        self, v: NDArray[np.float64], delta: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        squared = delta**2
        return v - (1.0 - self.beta2) * squared * np.sign(v - squared)


def make_server_optimizer(spec: AggregationSpec) -> ServerOptimizer:
    """The server optimiser a study asks for."""
    lr = spec.effective_learning_rate
    if spec.strategy is Strategy.FEDAVG:
        return FedAvg(lr)
    if spec.strategy is Strategy.FEDAVGM:
        return FedAvgM(lr, spec.server_momentum)
    adaptive: dict[Strategy, type[_Adaptive]] = {
        Strategy.FEDADAGRAD: FedAdagrad,
        Strategy.FEDADAM: FedAdam,
        Strategy.FEDYOGI: FedYogi,
    }
    return adaptive[spec.strategy](lr, spec.beta1, spec.beta2, spec.tau)
