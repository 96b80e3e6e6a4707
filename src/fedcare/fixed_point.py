"""The fixed-point plan of secure aggregation: the scale and weight bits for a study's
settings, refused when a sum over ``max_sites`` sites could leave the signed range of
``bits`` bits. Pure integer arithmetic, so the study contract can check its own
settings without the quantiser (:mod:`fedcare.privacy.secagg.quantize`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_LEVELS = 1024
"""Fewest quantisation steps across [0, clip_norm] accepted for one site's value."""
MAX_WEIGHT_BITS = 30
EXACT_FLOAT = 2**52
"""Largest scaled value used: float64 still rounds integers exactly below it."""


class QuantizationError(ValueError):
    """A quantisation setting under which a sum could wrap around, or is too coarse."""


@dataclass(frozen=True)
class Quantization:
    """How values and weights map to Z_{2^bits} for sums of up to ``max_sites`` sites."""

    bits: int
    clip_norm: float
    max_sites: int
    scale: float
    weight_scale: int

    @property
    def limit(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def worst_case_sum(self) -> int:
        """The largest absolute integer a sum of ``max_sites`` encoded elements can reach.

        One step for stochastic rounding, and one more for a clipped coordinate that
        floating point leaves a hair above ``clip_norm``."""
        value = math.floor(self.clip_norm * self.scale) + 2
        return self.max_sites * max(value, self.weight_scale)

    def error_bound(self, n_sites: int) -> float:
        """Largest absolute error of a coordinate of the weighted sum (before dividing)."""
        return n_sites / self.scale


def plan_quantization(
    bits: int, clip_norm: float, max_sites: int, fraction_bits: int | None = None
) -> Quantization:
    """The fixed-point scale for a study, or :class:`QuantizationError` if it could overflow.

    ``fraction_bits`` fixes the scale at 2**fraction_bits; without it the
    finest power of two that cannot overflow is used.
    """
    if bits not in (32, 64):
        raise QuantizationError(f"secure aggregation sums in 32 or 64 bits, not {bits}")
    if not clip_norm > 0 or not math.isfinite(clip_norm):
        raise QuantizationError("clip_norm must be a positive number")
    if max_sites < 1:
        raise QuantizationError("max_sites must be at least 1")
    limit = (1 << (bits - 1)) - 1
    per_site = limit // max_sites
    weight_bits = min(MAX_WEIGHT_BITS, per_site.bit_length() - 1)
    if fraction_bits is None:
        room = min(per_site - 2, EXACT_FLOAT) / clip_norm
        if room < 1:
            raise QuantizationError(
                f"{max_sites} sites with clip_norm {clip_norm} do not fit in {bits} bits"
            )
        fraction_bits = math.floor(math.log2(room))
    plan = Quantization(bits, clip_norm, max_sites, float(2.0**fraction_bits), 2**weight_bits)
    worst = plan.worst_case_sum()
    if worst > limit:
        raise QuantizationError(
            f"a sum over {max_sites} sites could reach {worst} > 2^{bits - 1} - 1 with "
            f"clip_norm {clip_norm} and {fraction_bits} fraction bits: use bits: 64, "
            "fewer fraction bits, a smaller clip_norm or fewer sites"
        )
    if clip_norm * plan.scale > EXACT_FLOAT:
        raise QuantizationError(
            f"{fraction_bits} fraction bits with clip_norm {clip_norm} exceed float64's exact "
            "integers (2^52); use fewer fraction bits"
        )
    if clip_norm * plan.scale < MIN_LEVELS:
        raise QuantizationError(
            f"with {max_sites} sites and clip_norm {clip_norm}, {bits} bits leave only "
            f"{clip_norm * plan.scale:.0f} steps per site value (at least {MIN_LEVELS} needed): "
            "use bits: 64 or more fraction bits"
        )
    return plan
