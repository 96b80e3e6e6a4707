"""Whether a training run had settled: a pure check on its loss curve."""

from __future__ import annotations

from collections.abc import Sequence

CONVERGENCE_WINDOW = 3
"""Rounds over which the loss is compared with its value before them."""

CONVERGENCE_TOLERANCE = 0.01
"""A relative fall larger than this over the window means the loss is still falling."""


def still_falling(
    losses: Sequence[float | None],
    window: int = CONVERGENCE_WINDOW,
    tolerance: float = CONVERGENCE_TOLERANCE,
) -> float | None:
    """The relative fall of the loss over its last ``window`` rounds when it exceeds
    ``tolerance`` (the model is likely under-trained); None when it has settled or
    when too few rounds report a loss to tell."""
    known = [loss for loss in losses if loss is not None]
    if len(known) <= window:
        return None
    before, last = known[-window - 1], known[-1]
    if before <= 0:
        return None
    fall = (before - last) / before
    return fall if fall > tolerance else None
