"""Validation: metrics on held-out data, subgroup reports, release gates and decisions.

The package imports nothing heavy itself; the study's validation settings and gate
specs live beneath it, in :mod:`fedcare.validation_spec`.
"""
