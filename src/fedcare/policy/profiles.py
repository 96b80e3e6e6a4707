"""Jurisdiction profiles: each law's rules as data, with the instrument each comes from.

A profile is a YAML file shipped with fedcare (``policy/profiles/<jurisdiction>.yaml``).
Every rule has an id, a plain-language statement, its parameters, its source, and
its *basis*: whether the number or list is stated by the law itself, by official
guidance, or is a conservative fedcare default where the law states a principle
but no number. ``docs/governance.md`` lists every rule.

The ``check`` field says which machine check a rule drives (see
:mod:`fedcare.policy.checks`); a retention rule drives no study check and is read
by the audit trail through :attr:`JurisdictionProfile.audit_retention_days`.
"""

from __future__ import annotations

from enum import StrEnum
from functools import cache
from importlib.resources import files
from typing import Annotated, Literal, Self

import yaml
from pydantic import Field, ValidationError, model_validator

from fedcare.policy.findings import Severity
from fedcare.policy.model import Jurisdiction, PolicyError, Region, SafeguardMechanism
from fedcare.schema.features import Strict

RULE_ID = r"^[A-Z]+(-[A-Z0-9]+)+$"
# A name pattern is a run of whole snake_case words, e.g. "date_of_birth".
NamePattern = Annotated[str, Field(pattern=r"^[a-z0-9]+(_[a-z0-9]+)*$")]


class Basis(StrEnum):
    """Where a rule's parameter values come from."""

    LAW = "law"  # the statute or regulation states the value
    GUIDANCE = "guidance"  # a regulator's published guidance states it
    FEDCARE_DEFAULT = "fedcare_default"  # the law states a principle; the number is ours


class _Rule(Strict):
    id: str = Field(pattern=RULE_ID)
    statement: str = Field(min_length=1)
    source: str = Field(min_length=1)
    basis: Basis
    severity: Severity = Severity.REFUSE


class CohortRule(_Rule):
    """No released number may rest on fewer patients than ``min_cohort_size``."""

    check: Literal["min_cohort_size"]
    min_cohort_size: int = Field(ge=1)


class TransferRule(_Rule):
    """Where the coordinator may be: home regions, adequate regions, or a recorded safeguard."""

    check: Literal["coordinator_region"]
    home_regions: tuple[Region, ...] = Field(min_length=1)
    adequate_regions: tuple[Region, ...] = ()
    accepted_safeguards: tuple[SafeguardMechanism, ...] = Field(min_length=1)


class IdentifierRule(_Rule):
    """Schema names that look like direct identifiers (matched as whole snake_case words)."""

    check: Literal["identifiers"]
    patterns: tuple[NamePattern, ...] = Field(min_length=1)


class GeographyRule(_Rule):
    """Postal codes: refused at full precision; coarse forms allowed, minus restricted values."""

    check: Literal["geography"]
    full_precision: tuple[NamePattern, ...] = Field(min_length=1)
    coarse: tuple[NamePattern, ...] = ()
    restricted_values: tuple[str, ...] = Field(
        default=(), description="Coarse codes that still identify too few people."
    )


class AgeRule(_Rule):
    """An age feature whose allowed range goes above ``max_age``."""

    check: Literal["age_cap"]
    patterns: tuple[NamePattern, ...] = Field(min_length=1)
    max_age: float = Field(gt=0)


class PrivacyRule(_Rule):
    """Updates should be differentially private."""

    check: Literal["differential_privacy"]


class RetentionRule(_Rule):
    """How long the site's audit trail must be kept; read by the audit module."""

    check: Literal["audit_retention"]
    retention_days: int = Field(ge=1)


Rule = Annotated[
    CohortRule
    | TransferRule
    | IdentifierRule
    | GeographyRule
    | AgeRule
    | PrivacyRule
    | RetentionRule,
    Field(discriminator="check"),
]


class JurisdictionProfile(Strict):
    """One jurisdiction's rules."""

    jurisdiction: Jurisdiction
    title: str = Field(min_length=1)
    rules: tuple[Rule, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        ids = [rule.id for rule in self.rules]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"rule ids used twice: {', '.join(repeated)}")
        # The audit module and the cohort check each need exactly one number.
        for kind in (RetentionRule, CohortRule):
            count = sum(isinstance(rule, kind) for rule in self.rules)
            if count != 1:
                raise ValueError(f"a profile has exactly one {kind.__name__}, found {count}")
        return self

    def rule(self, rule_id: str) -> Rule:
        """The rule with this id."""
        for rule in self.rules:
            if rule.id == rule_id:
                return rule
        raise KeyError(rule_id)

    @property
    def cohort_rule(self) -> CohortRule:
        return next(rule for rule in self.rules if isinstance(rule, CohortRule))

    @property
    def retention_rule(self) -> RetentionRule:
        return next(rule for rule in self.rules if isinstance(rule, RetentionRule))

    @property
    def audit_retention_days(self) -> int:
        """The shortest time the site's audit trail may be kept, in days."""
        return self.retention_rule.retention_days


def parse_profile(text: str, source: str = "<profile>") -> JurisdictionProfile:
    """Parse and validate a jurisdiction profile from YAML text."""
    try:
        return JurisdictionProfile.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as exc:
        raise PolicyError(f"{source}: not a valid jurisdiction profile:\n{exc}") from exc


@cache
def load_profile(jurisdiction: Jurisdiction | str) -> JurisdictionProfile:
    """The profile shipped with fedcare for ``jurisdiction`` (read once, then cached)."""
    try:
        key = Jurisdiction(jurisdiction)
    except ValueError:
        known = ", ".join(j.value for j in Jurisdiction)
        message = f"no profile for jurisdiction {jurisdiction!r} (known: {known})"
        raise PolicyError(message) from None
    resource = files("fedcare.policy").joinpath("profiles", f"{key.value}.yaml")
    profile = parse_profile(resource.read_text(encoding="utf-8"), f"profiles/{key.value}.yaml")
    if profile.jurisdiction is not key:
        raise PolicyError(f"profiles/{key.value}.yaml declares {profile.jurisdiction.value}")
    return profile
