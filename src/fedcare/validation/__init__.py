"""Validation: metrics on held-out data, subgroup reports, release gates and decisions.

The package imports nothing heavy itself, so the study contract can use
:mod:`fedcare.validation.spec` without loading scikit-learn.
"""
