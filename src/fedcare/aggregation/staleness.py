"""How much an asynchronous update counts when it was trained on an older model."""

from __future__ import annotations

from fedcare.study import StalenessKind, StalenessSpec


def staleness_factor(staleness: int, spec: StalenessSpec) -> float:
    """The factor in (0, 1] an update ``staleness`` model versions old is weighted by:
    (1 + s)^-a for the polynomial rule (FedBuff), 1 for the constant one."""
    if staleness < 0:
        raise ValueError(f"staleness {staleness} is negative: the update is from a later model")
    if spec.kind is StalenessKind.CONSTANT:
        return 1.0
    return float((1.0 + staleness) ** -spec.exponent)
