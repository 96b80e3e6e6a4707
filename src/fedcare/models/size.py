"""How many values the study's model exchanges; for the built-in tabular models without
building them (and without PyTorch)."""

from __future__ import annotations

from itertools import pairwise

from fedcare.study import ModelKind, ModelSpec, Study


def count_parameters(spec: ModelSpec, input_shape: tuple[int, ...]) -> int:
    """The flat vector's length for the model ``models/builders.py`` builds for these inputs.

    Logistic regression and the MLP are counted from their widths; a CNN or a module is
    built once (which needs PyTorch, as training it does).
    """
    if spec.kind in (ModelKind.LOGISTIC_REGRESSION, ModelKind.MLP):
        widths = [*input_shape, *spec.hidden, 1]
        return sum(fan_in * fan_out + fan_out for fan_in, fan_out in pairwise(widths))
    import torch

    from fedcare.models.builders import build_model
    from fedcare.models.params import parameter_count

    with torch.random.fork_rng(devices=[]):
        return parameter_count(build_model(spec, input_shape))


def study_parameter_count(study: Study) -> int:
    """The length of the flat parameter vector every party exchanges for ``study``."""
    return count_parameters(study.model, study.feature_schema.input_shape)
