"""A study's secure-aggregation settings turned into a round's public parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence

from fedcare.fixed_point import Quantization, plan_quantization
from fedcare.ids import derive_seed
from fedcare.privacy.secagg.graph import default_degree
from fedcare.privacy.secagg.keys import SecAggError
from fedcare.privacy.secagg.session import RoundSetup, round_setup
from fedcare.study import SecAggGraph, Study, Weighting


def quantization_for(study: Study) -> Quantization:
    """The study's fixed-point plan (its settings were checked when the study was read)."""
    spec = study.secure_aggregation
    if not spec.enabled or spec.clip_norm is None:
        raise SecAggError(f"study '{study.name}' does not use secure aggregation")
    return plan_quantization(spec.bits, spec.clip_norm, spec.max_sites, spec.fraction_bits)


def setup_for(
    study: Study, round_number: int, selected: Sequence[str], n_params: int, task_sha256: str
) -> RoundSetup:
    """Graph, threshold and vector length of the session for one task, the same at every
    party that was shown the same participants and task."""
    spec = study.secure_aggregation
    degree = None
    if spec.graph is SecAggGraph.SPARSE:
        degree = spec.degree if spec.degree is not None else default_degree(len(selected))
    return round_setup(
        study.content_hash,
        round_number,
        selected,
        task_sha256=task_sha256,
        degree=degree,
        threshold_fraction=spec.threshold,
        seed=derive_seed(study.seed, "secagg-graph", round_number),
        bits=spec.bits,
        length=n_params + 1,
    )


def site_weight(study: Study, n_samples: int) -> float:
    """A site's weight in (0, 1]: its raw weight as a share of the largest one allowed."""
    spec = study.secure_aggregation
    if n_samples > spec.max_records:
        raise SecAggError(
            f"the site has {n_samples} training records, more than "
            f"secure_aggregation.max_records ({spec.max_records}); the study must raise it"
        )
    weighting = study.aggregation.weighting
    if weighting is Weighting.SAMPLES:
        return n_samples / spec.max_records
    if weighting is Weighting.SQRT:
        return math.sqrt(n_samples / spec.max_records)
    if weighting is Weighting.EQUAL:
        return 1.0
    raise SecAggError(f"weighting '{weighting}' cannot be used with secure aggregation")
