"""Whether a candidate release is promoted: pure rules over the sites' verdicts.

A release is decided once every required site has returned a verdict, or when
the validation deadline passes. It is promoted when at least ``quorum`` sites
passed (every required site when no quorum is set); a site that returned no
verdict counts as not passed, because nothing shows the model is safe there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from fedcare.validation.gates import Verdict


class ReleaseState(StrEnum):
    CANDIDATE = "candidate"
    PROMOTED = "promoted"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Decision:
    state: ReleaseState
    reason: str


def required_passes(required: Sequence[str], quorum: int | None) -> int:
    """How many sites must pass: ``quorum``, or all of ``required``."""
    if quorum is not None and quorum > len(required):
        raise ValueError(
            f"the quorum of {quorum} site(s) exceeds the {len(required)} site(s) that validate"
        )
    return len(required) if quorum is None else quorum


def decide(
    required: Sequence[str],
    verdicts: Mapping[str, Verdict],
    quorum: int | None,
    deadline_passed: bool,
) -> Decision | None:
    """The decision on a release, or None while verdicts are still due.

    Only verdicts of ``required`` sites count. The reason of a rejection lists
    every failing site's reasons (they name the site, the subgroup, the metric
    and the threshold) and every site that did not answer.
    """
    needed = required_passes(required, quorum)
    counted = {site: verdicts[site] for site in required if site in verdicts}
    silent = [site for site in required if site not in counted]
    if silent and not deadline_passed:
        return None
    passed = sorted(site for site, verdict in counted.items() if verdict.passed)
    failed = sorted(site for site, verdict in counted.items() if not verdict.passed)
    tally = f"{len(passed)} of {len(required)} site(s) passed, {needed} needed"
    if len(passed) >= needed:
        extra = f"; failed: {', '.join(failed)}" if failed else ""
        extra += f"; no verdict: {', '.join(silent)}" if silent else ""
        return Decision(ReleaseState.PROMOTED, tally + extra)
    problems = [reason for site in failed for reason in counts_reasons(counted[site])]
    problems += [f"site {site}: no verdict by the validation deadline" for site in silent]
    return Decision(ReleaseState.REJECTED, tally + ": " + "; ".join(problems))


def counts_reasons(verdict: Verdict) -> list[str]:
    """A failing verdict's reasons, or a generic one if the site gave none."""
    return verdict.reasons or [f"site {verdict.site}: failed without a stated reason"]
