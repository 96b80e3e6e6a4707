"""Model builders and the flat-parameter view that travels between parties."""

from fedcare.models.builders import build_model, initial_parameters
from fedcare.models.params import get_flat, set_flat

__all__ = ["build_model", "get_flat", "initial_parameters", "set_flat"]
