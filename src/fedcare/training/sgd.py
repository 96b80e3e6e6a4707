"""Stochastic gradient descent with momentum and weight decay, for the site's small models.

The update is exactly ``torch.optim.SGD``'s (no dampening, no Nesterov), and a
test checks the two agree bit for bit. It exists because constructing any
``torch.optim`` optimiser imports ``torch._dynamo``: in torch 2.13 that costs
about 3 s and 70 MB in every process, which for a site agent or a simulation of
a small model is more than the training itself. Adam still uses ``torch.optim``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SGD:
    """``p <- p - lr * v`` with ``v <- momentum * v + (g + weight_decay * p)``."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        self.params = list(params)
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self._velocity: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            d_p = p.grad
            if self.weight_decay != 0:
                d_p = d_p.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                velocity = self._velocity[i]
                if velocity is None:
                    velocity = torch.clone(d_p).detach()
                    self._velocity[i] = velocity
                else:
                    velocity.mul_(self.momentum).add_(d_p)
                d_p = velocity
            p.add_(d_p, alpha=-self.lr)
