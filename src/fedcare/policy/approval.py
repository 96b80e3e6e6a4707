"""Approving a study by its exact content hash, and the site agent's gate before it connects.

An approval names one hash. Change any setting of the study (a learning rate, a
round count, a feature's range) and the hash changes, so the new study is not
approved until the officer reviews it again.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from fedcare.audit import AuditLog
from fedcare.policy.checks import check_study
from fedcare.policy.findings import Finding, refusals
from fedcare.policy.model import ApprovedStudy, PolicyError, SitePolicy, load_policy, save_policy
from fedcare.policy.profiles import JurisdictionProfile, load_profile
from fedcare.study import Study


class StudyRefusedError(PolicyError):
    """The policy refuses the study; ``findings`` names each refusing rule."""

    def __init__(self, message: str, findings: list[Finding]) -> None:
        self.findings = findings
        details = "\n".join(f"  - {finding}" for finding in findings)
        super().__init__(f"{message}:\n{details}")


def site_audit_path(policy_path: Path) -> Path:
    """The site's audit trail lives beside its policy: the officer's folder."""
    return policy_path.parent / "audit.jsonl"


def is_approved(policy: SitePolicy, study_hash: str) -> bool:
    """Whether the policy approves exactly this study hash."""
    return policy.approval(study_hash) is not None


def approve(
    policy_path: Path,
    study: Study,
    by: str,
    note: str = "",
    *,
    force: bool = False,
    now: datetime | None = None,
) -> SitePolicy:
    """Record ``study``'s hash as approved in the policy file and return the new policy.

    Refuses (:class:`StudyRefusedError`) a study that any rule refuses, unless
    ``force`` is set with a ``note`` giving the reason; the overridden rule ids are
    recorded with the approval. Approving an already approved hash changes nothing.
    The file is rewritten atomically.
    """
    if not by.strip():
        raise PolicyError("an approval needs the approver's name (--by)")
    policy = load_policy(policy_path)
    if is_approved(policy, study.content_hash):
        return policy
    blocking = refusals(check_study(study, policy, load_profile(policy.jurisdiction)))
    audit = AuditLog(site_audit_path(policy_path), policy.site)
    if blocking and not force:
        audit.append(
            "study.approval_refused",
            study=study.content_hash,
            name=study.name,
            by=by.strip(),
            rules=[f.rule_id for f in blocking],
        )
        raise StudyRefusedError(f"the policy refuses study '{study.name}'", blocking)
    if blocking and not note.strip():
        raise PolicyError("a forced approval needs a note giving the reason (--note)")
    overridden = tuple(dict.fromkeys(finding.rule_id for finding in blocking))
    entry = ApprovedStudy(
        hash=study.content_hash,
        name=study.name,
        approved_by=by.strip(),
        # Whole seconds: people read this file.
        approved_at=now or datetime.now(UTC).replace(microsecond=0),
        note=(f"forced despite {', '.join(overridden)}: " if overridden else "") + note.strip(),
        overridden=overridden,
    )
    updated = policy.model_copy(update={"approved_studies": (*policy.approved_studies, entry)})
    # Re-validate the whole policy before writing it, as a fresh file would be.
    updated = SitePolicy.model_validate(updated.model_dump())
    save_policy(updated, policy_path)
    audit.append(
        "study.approved",
        study=study.content_hash,
        name=study.name,
        by=entry.approved_by,
        note=entry.note,
        overridden=list(overridden),
    )
    return updated


def ensure_allowed(
    study: Study,
    policy: SitePolicy,
    profile: JurisdictionProfile | None = None,
    coordinator_url: str | None = None,
) -> list[Finding]:
    """The site agent's gate before it connects: raise unless this exact study may run.

    The hash must be approved, and no rule may refuse the study now (the policy may
    have changed since the approval) except rules the officer overrode when
    approving. Returns the remaining findings (warnings and overridden refusals).
    """
    approval = policy.approval(study.content_hash)
    if approval is None:
        raise PolicyError(
            f"study '{study.name}' ({study.content_hash}) is not approved by this site's "
            "policy; the officer reviews it with 'fedcare site review' and approves it with "
            "'fedcare site approve'"
        )
    profile = profile or load_profile(policy.jurisdiction)
    findings = check_study(study, policy, profile, coordinator_url)
    blocking = [f for f in refusals(findings) if f.rule_id not in approval.overridden]
    if blocking:
        raise StudyRefusedError(f"the policy now refuses study '{study.name}'", blocking)
    return findings
