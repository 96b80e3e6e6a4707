"""The site's own gate: nothing runs unless the site's policy allows this exact study.

Checked before the agent opens any connection, so a refused study never learns
that the site exists.
"""

from __future__ import annotations

from fedcare.audit import AuditLog
from fedcare.config import SiteConfig
from fedcare.policy import Finding, PolicyError, ensure_allowed, load_policy, load_profile
from fedcare.policy.approval import site_audit_path
from fedcare.site.dataset import SiteDataset
from fedcare.study import Study


def admit_study(config: SiteConfig, study: Study, data: SiteDataset) -> list[Finding]:
    """Raise :class:`PolicyError` unless the policy approves ``study`` as it is now.

    Returns the remaining findings (warnings, and refusals the officer overrode).
    """
    if config.policy is None:
        raise PolicyError(
            f"site '{config.site}' has no policy file: a site runs only studies its policy "
            "approves (set 'policy:' in site.yaml; see docs/governance.md)"
        )
    policy = load_policy(config.policy)
    if policy.site != config.site:
        raise PolicyError(
            f"the policy in {config.policy} is for site '{policy.site}', not '{config.site}'"
        )
    audit = AuditLog(site_audit_path(config.policy), config.site)
    try:
        profile = load_profile(policy.jurisdiction)
        findings = ensure_allowed(study, policy, profile, coordinator_url=str(config.coordinator))
        smallest = max(policy.min_cohort_size, profile.cohort_rule.min_cohort_size)
        if data.n_train < smallest:
            # Every update carries the training-record count: it must not describe a tiny group.
            raise PolicyError(
                f"site '{config.site}' has {data.n_train} training rows; its policy and the "
                f"{policy.jurisdiction.value} profile need at least {smallest} behind anything "
                "sent"
            )
    except PolicyError as exc:
        audit.append("study.refused", study=study.content_hash, name=study.name, reason=str(exc))
        raise
    audit.append(
        "study.admitted",
        study=study.content_hash,
        name=study.name,
        coordinator=str(config.coordinator),
        warnings=[f.rule_id for f in findings],
    )
    return findings
