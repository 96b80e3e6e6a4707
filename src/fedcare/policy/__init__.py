"""Site policy, jurisdiction profiles, study review and approval.

The site's privacy / compliance officer writes ``policy.yaml`` (kept at the site,
never sent); fedcare checks every study against it and against the jurisdiction's
profile, and a site runs only a study whose exact content hash is approved.
See docs/governance.md.
"""

from fedcare.models.size import count_parameters
from fedcare.policy.approval import StudyRefusedError, approve, ensure_allowed, is_approved
from fedcare.policy.checks import check_study, declares_differential_privacy
from fedcare.policy.findings import Finding, Severity, refusals
from fedcare.policy.model import (
    ApprovedStudy,
    DatasetBudget,
    Jurisdiction,
    PolicyError,
    SafeguardMechanism,
    SitePolicy,
    TransferSafeguard,
    dump_policy,
    load_policy,
    parse_policy,
    save_policy,
)
from fedcare.policy.profiles import Basis, JurisdictionProfile, load_profile, parse_profile
from fedcare.policy.review import StudyReview, review_study

__all__ = [
    "ApprovedStudy",
    "Basis",
    "DatasetBudget",
    "Finding",
    "Jurisdiction",
    "JurisdictionProfile",
    "PolicyError",
    "SafeguardMechanism",
    "Severity",
    "SitePolicy",
    "StudyRefusedError",
    "StudyReview",
    "TransferSafeguard",
    "approve",
    "check_study",
    "count_parameters",
    "declares_differential_privacy",
    "dump_policy",
    "ensure_allowed",
    "is_approved",
    "load_policy",
    "load_profile",
    "parse_policy",
    "parse_profile",
    "refusals",
    "review_study",
    "save_policy",
]
