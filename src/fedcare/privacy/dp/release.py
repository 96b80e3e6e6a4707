"""What one DP release is keyed on in a site's ledger."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Release:
    """What the mechanism is about to see: the task, and a fingerprint of the exact rows.

    Two releases are the same only if all of it is the same; otherwise the second
    is charged in full with fresh noise.
    """

    study_hash: str
    study_name: str
    round: int
    task_sha256: str
    fingerprint: str
    """SHA-256 over the training matrix, labels and preprocessing parameters."""
    preprocessing: str
    """The preprocessing parameters as JSON, kept for the privacy officer."""
