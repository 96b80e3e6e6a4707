"""Fixed point in Z_{2^b}: clipped, weighted updates in, a weighted sum and weight sum out.

A site clips its delta to L2 norm ``clip_norm`` (so every coordinate lies in
[-clip_norm, clip_norm]), multiplies it by its weight in (0, 1], and rounds
``value * scale`` stochastically (unbiased) to an integer. Its quantised weight
travels as one extra element. The scale is chosen, or checked, so that the sum
over ``max_sites`` sites can never leave the signed range of ``bits`` bits:
overflow is impossible by construction, and a configuration where it is not is
refused (:mod:`fedcare.fixed_point`). Nothing is clipped by the quantiser itself.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from fedcare.fixed_point import Quantization, QuantizationError
from fedcare.privacy.secagg.prg import dtype_for


def clip_l2(delta: NDArray[np.float32], clip_norm: float) -> NDArray[np.float64]:
    """``delta`` scaled down to L2 norm ``clip_norm`` if it is longer; else unchanged."""
    x = np.asarray(delta, dtype=np.float64)
    norm = float(np.linalg.norm(x))
    if not math.isfinite(norm):
        raise QuantizationError("the update contains NaN or infinite values")
    return x * (clip_norm / norm) if norm > clip_norm else x


def quantize_weight(weight: float, plan: Quantization) -> int:
    """The weight in (0, 1] as an integer of ``plan.weight_scale``; at least 1."""
    if not 0 < weight <= 1:
        raise QuantizationError(f"a site weight must lie in (0, 1], not {weight}")
    return max(1, round(weight * plan.weight_scale))


def encode(
    delta: NDArray[np.float32], weight: float, plan: Quantization, rng: np.random.Generator
) -> NDArray[np.unsignedinteger]:
    """Clip, weight and stochastically round ``delta``; the weight is the last element."""
    clipped = clip_l2(delta, plan.clip_norm)
    w_int = quantize_weight(weight, plan)
    scaled = clipped * (w_int / plan.weight_scale * plan.scale)
    low = np.floor(scaled)
    rounded = low + (rng.random(scaled.shape[0]) < (scaled - low))
    out = np.empty(scaled.shape[0] + 1, dtype=np.int64)
    out[:-1] = rounded
    out[-1] = w_int
    # Casting two's complement int64 to uintN keeps the value modulo 2^N.
    return out.astype(dtype_for(plan.bits))


def decode_sum(
    total: NDArray[np.unsignedinteger], plan: Quantization
) -> tuple[NDArray[np.float64], float]:
    """The weighted sum of the sites' clipped deltas and the sum of their weights."""
    signed = total.view(np.int32 if plan.bits == 32 else np.int64)
    weight_sum = float(signed[-1]) / plan.weight_scale
    return signed[:-1].astype(np.float64) / plan.scale, weight_sum


def check_sum_bound(
    weighted_sum: NDArray[np.float64], weight_sum: float, n_sites: int, plan: Quantization
) -> None:
    """Raise :class:`QuantizationError` unless the unmasked sum is one that ``n_sites``
    honest inputs could produce: each weight in (0, 1], each delta clipped to
    ``clip_norm``, so the weight sum lies in (0, n] and the sum's L2 norm is at most
    ``weight_sum * clip_norm`` (plus the rounding error of the fixed point).

    A site that masks a vector outside its clip bound, or a weight outside (0, 1], can
    push the sum outside this bound; one that sends any vector inside it cannot be
    told from an honest site (docs/robust_aggregation.md)."""
    if not 0.0 < weight_sum <= n_sites:
        raise QuantizationError(
            f"the unmasked weight sum {weight_sum:.6g} is outside (0, {n_sites}]: a site "
            "sent a weight no honest site can"
        )
    norm = float(np.linalg.norm(weighted_sum))
    rounding = math.sqrt(weighted_sum.shape[0]) * plan.error_bound(n_sites)
    bound = weight_sum * plan.clip_norm + rounding
    if not norm <= bound:
        raise QuantizationError(
            f"the unmasked sum has L2 norm {norm:.6g}, above the {bound:.6g} that "
            f"{n_sites} clipped update(s) can reach: a site sent an input outside its clip "
            "bound"
        )
