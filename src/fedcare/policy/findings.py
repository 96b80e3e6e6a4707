"""What a policy check reports: one finding per broken or noteworthy rule."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from fedcare.schema.features import Strict


class Severity(StrEnum):
    """``refuse`` blocks approval (unless forced, with a reason); ``warn`` is for the officer."""

    REFUSE = "refuse"
    WARN = "warn"


class Finding(Strict):
    """One rule's verdict on a study, naming the rule and the instrument it comes from."""

    rule_id: str = Field(min_length=1)
    source: str = Field(min_length=1, description="The law, guidance or policy field behind it.")
    message: str = Field(min_length=1)
    severity: Severity

    def __str__(self) -> str:
        return f"{self.severity.value} {self.rule_id}: {self.message} [{self.source}]"


def refusals(findings: tuple[Finding, ...] | list[Finding]) -> list[Finding]:
    """The findings that block approval."""
    return [finding for finding in findings if finding.severity is Severity.REFUSE]
