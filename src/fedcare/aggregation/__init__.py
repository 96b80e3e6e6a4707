"""Aggregation: client weighting, the weighted mean, and server optimisers."""

from fedcare.aggregation.mean import weighted_mean
from fedcare.aggregation.optimizers import ServerOptimizer, make_server_optimizer
from fedcare.aggregation.staleness import staleness_factor
from fedcare.aggregation.weighting import client_weights

__all__ = [
    "ServerOptimizer",
    "client_weights",
    "make_server_optimizer",
    "staleness_factor",
    "weighted_mean",
]
