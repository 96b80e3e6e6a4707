"""Server optimisers: turn the averaged site update into the next global model.

Sites send parameter deltas (new minus global). The server treats the negated
mean delta as a pseudo-gradient, so FedAvg with a server learning rate of 1 is
plain parameter averaging.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from fedcare.study import AggregationSpec, Strategy


class ServerOptimizer(Protocol):
    """One step of the global model from the round's averaged delta."""

    def step(
        self, params: NDArray[np.float32], mean_delta: NDArray[np.float32]
    ) -> NDArray[np.float32]: ...


class FedAvg:
    """x <- x + eta * mean_delta."""

    def __init__(self, learning_rate: float = 1.0) -> None:
        self.learning_rate = learning_rate

    def step(
        self, params: NDArray[np.float32], mean_delta: NDArray[np.float32]
    ) -> NDArray[np.float32]:
        return (params + self.learning_rate * mean_delta).astype(np.float32)


def make_server_optimizer(spec: AggregationSpec) -> ServerOptimizer:
    """The server optimiser a study asks for."""
    if spec.strategy is Strategy.FEDAVG:
        return FedAvg(spec.server_learning_rate)
    raise ValueError(f"unknown strategy {spec.strategy}")
