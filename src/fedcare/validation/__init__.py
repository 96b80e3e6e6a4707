"""Validation: metrics on held-out data."""

from fedcare.validation.metrics import BinaryMetrics, binary_metrics

__all__ = ["BinaryMetrics", "binary_metrics"]
