"""How many parameters the study's model has, without building it (and without PyTorch)."""

from __future__ import annotations

from itertools import pairwise

from fedcare.study import ModelSpec, Study


def count_parameters(spec: ModelSpec, n_inputs: int) -> int:
    """Weights and biases of the model ``models/builders.py`` builds for these inputs."""
    widths = [n_inputs, *spec.hidden, 1]
    return sum(fan_in * fan_out + fan_out for fan_in, fan_out in pairwise(widths))


def study_parameter_count(study: Study) -> int:
    """The length of the flat parameter vector every party exchanges for ``study``."""
    return count_parameters(study.model, study.feature_schema.n_inputs)
