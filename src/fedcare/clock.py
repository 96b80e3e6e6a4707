"""The coordinator's clock: deadlines that a stepped wall clock cannot move.

A round's and a release's deadlines are absolute seconds, stored so that they
survive a restart. While the process runs they are compared with
:class:`SteadyClock`, which reads the wall clock once at start and then only
advances with the monotonic clock: an NTP step, a leap or an operator's
``date -s`` neither fails a round early nor keeps one open for ever. Across a
restart the two clocks can disagree by anything, so :func:`rebase_deadline`
bounds each stored deadline to what the study allows from the moment of the
restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable

RESTART_GRACE_S = 60.0
"""After a restart, an open round or release waits at least this long (or its full
deadline, if shorter), so sites that were cut off by the outage can send again."""


class SteadyClock:
    """Seconds since the epoch as read at start, advanced by the monotonic clock."""

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        steady: Callable[[], float] = time.monotonic,
    ) -> None:
        self._origin = wall()
        self._start = steady()
        self._steady = steady

    def __call__(self) -> float:
        return self._origin + (self._steady() - self._start)


def rebase_deadline(
    deadline: float, now: float, full_s: float, grace_s: float = RESTART_GRACE_S
) -> float:
    """A stored deadline made safe after a restart at ``now``: never more than one full
    deadline away (a clock that stepped back, or a wrong stored value) and never sooner
    than the grace (a clock that stepped forward, or a long outage)."""
    return min(max(deadline, now + min(grace_s, full_s)), now + full_s)
