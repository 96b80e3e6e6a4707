"""Personal models at a site (the study's ``personalization``), beside the global one.

finetune
    Local epochs from the final global model, once the study has finished.
ditto (Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization")
    Every round, the site's personal model takes local epochs on its own loss plus
    ``lam / 2 * ||v - w||^2``, where ``w`` is that round's global model.
fedbn (Li et al. 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization")
    The model's normalisation layers (their weights and running statistics) stay at
    the site: each round trains from the global model with the site's own normalisation
    layers in place, and the update sent is zero at their positions. The personal model
    is the global model with them.

A personal model's parameters never leave the site: only the global model's update
does, exactly as without personalisation.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from numpy.typing import NDArray

from fedcare.models.builders import NORM_LAYERS, build_model
from fedcare.models.params import norm_mask
from fedcare.study import (
    ModelSpec,
    PersonalizationMethod,
    PersonalizationSpec,
    Study,
    TrainingSpec,
)
from fedcare.training.local import train_local


def personal_training(study: Study, spec: PersonalizationSpec) -> TrainingSpec:
    """The study's optimiser with the personalisation's epochs (and Ditto's pull)."""
    mu = spec.lam if spec.method is PersonalizationMethod.DITTO else 0.0
    return study.training.model_copy(
        update={"epochs": spec.epochs, "steps": None, "proximal_mu": mu}
    )


def train_personal(
    study: Study,
    spec: PersonalizationSpec,
    start: NDArray[np.float32],
    features: NDArray[np.float32],
    labels: NDArray[np.float32],
    seed: int,
    anchor: NDArray[np.float32] | None = None,
) -> NDArray[np.float32]:
    """``spec.epochs`` on this site's rows from ``start``: finetune from the final global
    model; Ditto's round from the personal model, pulled towards ``anchor`` (that round's
    global model) by ``spec.lam``."""
    training = personal_training(study, spec)
    return train_local(study.model, training, start, features, labels, seed, anchor=anchor).params


@cache
def _local_positions(spec: ModelSpec, input_shape: tuple[int, ...]) -> NDArray[np.bool_]:
    with torch.random.fork_rng(devices=[]):
        mask = norm_mask(build_model(spec, input_shape), NORM_LAYERS)
    mask.setflags(write=False)
    return mask


def local_positions(study: Study) -> NDArray[np.bool_]:
    """FedBN: True where the flat vector holds a normalisation layer's values."""
    return _local_positions(study.model, study.feature_schema.input_shape)


def with_local(
    study: Study, global_params: NDArray[np.float32], local: NDArray[np.float32] | None
) -> NDArray[np.float32]:
    """FedBN: the global model with this site's normalisation layers (when it has any yet)."""
    if local is None:
        return global_params
    mask = local_positions(study)
    return np.where(mask, local, global_params).astype(np.float32)
