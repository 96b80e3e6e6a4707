"""Differential privacy: the accountant, DP-SGD and the site's privacy ledger."""

from fedcare.privacy.dp.accountant import (
    AccountantKind,
    AccountingError,
    Mechanism,
    epsilon,
    noise_multiplier,
)

__all__ = ["AccountantKind", "AccountingError", "Mechanism", "epsilon", "noise_multiplier"]
