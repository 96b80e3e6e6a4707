"""Machine checks of a study against a site's policy and its jurisdiction's profile.

Everything here is a pure function of its arguments: no files, no network, no
clock. The site agent can therefore run the same checks before it connects that
the officer saw when approving.

Two kinds of rules are checked:

* the profile's rules (ids such as ``PDPA-COHORT-1``), each citing its source;
* the site's own rules from ``policy.yaml`` (ids ``SITE-...``), citing the field.
"""

from __future__ import annotations

from pydantic import ValidationError

from fedcare.policy.findings import Finding, Severity
from fedcare.policy.model import PolicyError, SitePolicy, normalise_url
from fedcare.policy.profiles import (
    AgeRule,
    CohortRule,
    GeographyRule,
    IdentifierRule,
    JurisdictionProfile,
    PrivacyRule,
    TransferRule,
)
from fedcare.schema.features import FeatureType
from fedcare.study import Study

SITE_COHORT = "SITE-COHORT"
SITE_ARTEFACTS = "SITE-ARTEFACTS"
SITE_COORDINATOR = "SITE-COORDINATOR"


def declares_differential_privacy(study: Study) -> bool:
    """Whether the study's model updates are differentially private (``privacy.dp``)."""
    return study.privacy.dp


def _matches(name: str, pattern: str) -> bool:
    """Whether ``pattern``'s words occur as whole, consecutive words of ``name``.

    Whole words, so ``nric`` matches ``patient_nric`` but ``age`` does not match
    ``dosage``; a coarsened form with its own word (``zip3``) is not the full one.
    """
    words, wanted = name.split("_"), pattern.split("_")
    span = len(wanted)
    return any(words[i : i + span] == wanted for i in range(len(words) - span + 1))


def _first_match(name: str, patterns: tuple[str, ...]) -> str | None:
    return next((pattern for pattern in patterns if _matches(name, pattern)), None)


def _schema_columns(study: Study) -> list[tuple[str, str, tuple[str, ...] | None]]:
    """(role, name, categories) of every column the study reads at a site."""
    schema = study.feature_schema
    columns: list[tuple[str, str, tuple[str, ...] | None]] = [
        ("feature", f.name, f.categories) for f in schema.features
    ]
    columns += [("attribute", a.name, a.categories) for a in schema.attributes]
    columns.append(("label", schema.label.name, None))
    return columns


def _cohort(study: Study, policy: SitePolicy, rule: CohortRule) -> list[Finding]:
    declared = study.disclosure.min_cohort_size
    required = max(rule.min_cohort_size, policy.min_cohort_size)
    if declared >= required:
        return []
    # Name the rule that sets the bar; on a tie the jurisdiction's rule, which cites a source.
    if rule.min_cohort_size >= policy.min_cohort_size:
        rule_id, source = rule.id, rule.source
    else:
        rule_id, source = SITE_COHORT, "policy.yaml: min_cohort_size"
    return [
        Finding(
            rule_id=rule_id,
            source=source,
            severity=Severity.REFUSE,
            message=(
                f"the study allows released numbers about groups as small as {declared} "
                f"patients (disclosure.min_cohort_size); this site requires at least {required} "
                f"({rule.id}: {rule.min_cohort_size}; site policy: {policy.min_cohort_size}). "
                "Every model update also carries the site's training-record count."
            ),
        )
    ]


def _artefacts(study: Study, policy: SitePolicy) -> list[Finding]:
    extra = [a.value for a in study.disclosure.artefacts if a not in policy.allowed_artefacts]
    if not extra:
        return []
    allowed = ", ".join(a.value for a in policy.allowed_artefacts) or "nothing"
    return [
        Finding(
            rule_id=SITE_ARTEFACTS,
            source="policy.yaml: allowed_artefacts",
            severity=Severity.REFUSE,
            message=f"the study sends {', '.join(extra)}; this site allows only {allowed}",
        )
    ]


def _coordinator(policy: SitePolicy, url: str | None) -> list[Finding]:
    if url is None:
        return []

    def refuse(message: str) -> list[Finding]:
        return [
            Finding(
                rule_id=SITE_COORDINATOR,
                source="policy.yaml: coordinators",
                severity=Severity.REFUSE,
                message=message,
            )
        ]

    try:
        normalised = normalise_url(url)
    except ValidationError:
        return refuse(f"{url!r} is not a valid coordinator URL")
    if not normalised.startswith("https://"):
        return refuse(f"the coordinator {url} does not use https")
    if not policy.allows_coordinator(url):
        listed = ", ".join(str(u) for u in policy.coordinators) or "none"
        return refuse(f"the coordinator {url} is not listed in the policy (listed: {listed})")
    return []


def _transfer(study: Study, policy: SitePolicy, rule: TransferRule) -> list[Finding]:
    region = study.disclosure.coordinator_region

    def finding(severity: Severity, message: str) -> list[Finding]:
        return [Finding(rule_id=rule.id, source=rule.source, severity=severity, message=message)]

    if region is None:
        return finding(
            rule.severity,
            "the study does not say where the coordinator runs, so the transfer cannot be "
            "assessed; the study must declare disclosure.coordinator_region",
        )
    if region in rule.home_regions or region in rule.adequate_regions:
        return []
    safeguard = policy.transfer_safeguard
    accepted = ", ".join(m.value for m in rule.accepted_safeguards)
    if safeguard is None or region not in safeguard.regions:
        return finding(
            rule.severity,
            f"the coordinator runs in {region}, outside {'/'.join(rule.home_regions[:3])}"
            f"{' and the adequacy list' if rule.adequate_regions else ''}; the policy records no "
            f"transfer_safeguard covering {region} (accepted mechanisms: {accepted})",
        )
    if safeguard.mechanism not in rule.accepted_safeguards:
        return finding(
            rule.severity,
            f"the recorded transfer_safeguard ({safeguard.mechanism.value}) is not a mechanism "
            f"this rule accepts ({accepted})",
        )
    # Allowed, but the officer should see what the transfer rests on.
    return finding(
        Severity.WARN,
        f"the coordinator runs in {region}; the transfer relies on the recorded "
        f"{safeguard.mechanism.value} ({safeguard.reference})",
    )


def _identifiers(study: Study, rule: IdentifierRule) -> list[Finding]:
    findings = []
    for role, name, _ in _schema_columns(study):
        pattern = _first_match(name, rule.patterns)
        if pattern is not None:
            findings.append(
                Finding(
                    rule_id=rule.id,
                    source=rule.source,
                    severity=rule.severity,
                    message=f"{role} '{name}' looks like a direct identifier "
                    f"(matches '{pattern}'); identifiers may not be study columns",
                )
            )
    return findings


def _geography(study: Study, rule: GeographyRule) -> list[Finding]:
    findings = []
    for role, name, categories in _schema_columns(study):
        coarse = _first_match(name, rule.coarse)
        if coarse is not None:
            if not rule.restricted_values:
                continue
            if categories is None:
                findings.append(
                    Finding(
                        rule_id=rule.id,
                        source=rule.source,
                        severity=Severity.WARN,
                        message=f"{role} '{name}' is a coarse postal code without listed "
                        "categories; check that every restricted area is coded 000",
                    )
                )
                continue
            restricted = sorted(set(categories) & set(rule.restricted_values))
            if restricted:
                findings.append(
                    Finding(
                        rule_id=rule.id,
                        source=rule.source,
                        severity=rule.severity,
                        message=f"{role} '{name}' keeps area codes that cover too few people: "
                        f"{', '.join(restricted)} (code them 000)",
                    )
                )
            continue
        full = _first_match(name, rule.full_precision)
        if full is not None:
            findings.append(
                Finding(
                    rule_id=rule.id,
                    source=rule.source,
                    severity=rule.severity,
                    message=f"{role} '{name}' looks like a full-precision postal code "
                    f"(matches '{full}'); use a coarse form"
                    + (f" such as {rule.coarse[0]}" if rule.coarse else ""),
                )
            )
    return findings


def _age(study: Study, rule: AgeRule) -> list[Finding]:
    findings = []
    for feature in study.feature_schema.features:
        if feature.type is not FeatureType.CONTINUOUS:
            continue
        if _first_match(feature.name, rule.patterns) is None:
            continue
        top = feature.range[1] if feature.range is not None else None
        if top is None or top > rule.max_age:
            allowed = "no upper limit" if top is None else f"values up to {top:g}"
            findings.append(
                Finding(
                    rule_id=rule.id,
                    source=rule.source,
                    severity=rule.severity,
                    message=f"feature '{feature.name}' allows {allowed}; ages above "
                    f"{rule.max_age:g} must share one top value: give it the range "
                    f"[low, {rule.max_age:g}] and record older ages as {rule.max_age:g}",
                )
            )
    return findings


def _privacy(study: Study, rule: PrivacyRule) -> list[Finding]:
    if declares_differential_privacy(study):
        return []
    return [
        Finding(
            rule_id=rule.id,
            source=rule.source,
            severity=rule.severity,
            message="the study's model updates are not differentially private; the officer "
            "decides whether its other safeguards are appropriate",
        )
    ]


def check_study(
    study: Study,
    policy: SitePolicy,
    profile: JurisdictionProfile,
    coordinator_url: str | None = None,
) -> list[Finding]:
    """Every finding of the profile's rules and the site's own rules on ``study``.

    ``coordinator_url``, when given, is checked against the policy's coordinators.
    Refusing findings block approval; warnings are for the officer to read.
    """
    if profile.jurisdiction is not policy.jurisdiction:
        raise PolicyError(
            f"the site policy is under {policy.jurisdiction.value} but the profile is "
            f"{profile.jurisdiction.value}"
        )
    findings = _cohort(study, policy, profile.cohort_rule)
    findings += _artefacts(study, policy)
    findings += _coordinator(policy, coordinator_url)
    for rule in profile.rules:
        if isinstance(rule, TransferRule):
            findings += _transfer(study, policy, rule)
        elif isinstance(rule, IdentifierRule):
            findings += _identifiers(study, rule)
        elif isinstance(rule, GeographyRule):
            findings += _geography(study, rule)
        elif isinstance(rule, AgeRule):
            findings += _age(study, rule)
        elif isinstance(rule, PrivacyRule):
            findings += _privacy(study, rule)
        # CohortRule is checked above together with the site's own minimum;
        # RetentionRule constrains the audit trail, not a study.
    return findings
