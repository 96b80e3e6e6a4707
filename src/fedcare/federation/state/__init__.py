"""The study state interface and its two implementations: in memory (simulation) and SQL
(the networked coordinator). One test suite runs against both (tests/test_state.py)."""

from fedcare.federation.state.base import (
    FinishedRound,
    OpenedRound,
    SiteRecord,
    SiteState,
    StateError,
    StoredModel,
    StoredReport,
    StoredRound,
    StudyRecord,
    StudyState,
)
from fedcare.federation.state.memory import MemoryState

__all__ = [
    "FinishedRound",
    "MemoryState",
    "OpenedRound",
    "SiteRecord",
    "SiteState",
    "StateError",
    "StoredModel",
    "StoredReport",
    "StoredRound",
    "StudyRecord",
    "StudyState",
]
