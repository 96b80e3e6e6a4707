"""Personal models at a site (the study's ``personalization``), beside the global one.

finetune
    Local epochs from the final global model, once the study has finished.
ditto (Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization")
    Every round, the site's personal model takes local epochs on its own loss plus
    ``lam / 2 * ||v - w||^2``, where ``w`` is that round's global model.

A personal model's parameters never leave the site: only the global model's update
does, exactly as without personalisation.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from fedcare.study import PersonalizationMethod, PersonalizationSpec, Study, TrainingSpec
from fedcare.training.local import train_local


def personal_training(study: Study, spec: PersonalizationSpec) -> TrainingSpec:
    """The study's optimiser with the personalisation's epochs (and Ditto's pull)."""
    mu = spec.lam if spec.method is PersonalizationMethod.DITTO else 0.0
    return study.training.model_copy(
        update={"epochs": spec.epochs, "steps": None, "proximal_mu": mu}
    )


def finetune(
    study: Study,
    spec: PersonalizationSpec,
    global_params: NDArray[np.float32],
    features: NDArray[np.float32],
    labels: NDArray[np.float32],
    seed: int,
) -> NDArray[np.float32]:
    """The final global model, trained on for ``spec.epochs`` on this site's rows."""
    training = personal_training(study, spec)
    return train_local(study.model, training, global_params, features, labels, seed).params


def ditto_step(
    study: Study,
    spec: PersonalizationSpec,
    personal: NDArray[np.float32],
    global_params: NDArray[np.float32],
    features: NDArray[np.float32],
    labels: NDArray[np.float32],
    seed: int,
) -> NDArray[np.float32]:
    """One round of the personal model: from itself, pulled towards this round's global."""
    training = personal_training(study, spec)
    return train_local(
        study.model, training, personal, features, labels, seed, anchor=global_params
    ).params
