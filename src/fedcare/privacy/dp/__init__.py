"""Differential privacy: the accountant, DP-SGD and the site's privacy ledger."""

from fedcare.privacy.dp.accountant import (
    AccountingError,
    Mechanism,
    epsilon,
    noise_multiplier,
)

__all__ = ["AccountingError", "Mechanism", "epsilon", "noise_multiplier"]
