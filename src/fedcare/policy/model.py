"""The site policy (``policy.yaml``): what a hospital allows, kept at the site and never sent.

The privacy / compliance officer owns this file. It names the site's jurisdiction
and region, the studies approved by exact content hash, the privacy budget per
data set, the minimum cohort size for any released number, the coordinators the
site may connect to, the kinds of information that may leave, and the transfer
safeguard (if any) that allows a coordinator abroad.

Validation is strict: an unknown key is an error that names its path, because a
misspelt rule that is silently ignored is a rule that does not exist.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import (
    AwareDatetime,
    Field,
    HttpUrl,
    field_validator,
)

from fedcare.config import ConfigError
from fedcare.ids import SHA256_HEX, SITE_NAME
from fedcare.schema.features import Strict
from fedcare.study import AccountantKind, Artefact
from fedcare.validation_spec import GateSpec
from fedcare.yamlfile import parse_yaml_model, read_yaml_model

# ISO 3166-1 alpha-2, plus "EU" (the study's coordinator_region allows it too).
Region = Annotated[str, Field(pattern=r"^[A-Z]{2}$")]
DatasetName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]


class PolicyError(ConfigError):
    """A policy file that cannot be read, does not validate, or refuses an action.

    A :class:`~fedcare.config.ConfigError`, so every command that already reports
    configuration errors cleanly reports policy errors the same way.
    """


class Jurisdiction(StrEnum):
    """The data-protection law a site works under; each has a profile of rules."""

    HIPAA = "hipaa"
    GDPR = "gdpr"
    PDPA = "pdpa"


class ApprovedStudy(Strict):
    """One study the officer approved, by the exact content hash of its settings."""

    hash: str = Field(pattern=SHA256_HEX, description="Study.content_hash (64 lowercase hex).")
    name: str = Field(min_length=1, max_length=200)
    approved_by: str = Field(min_length=1, max_length=200)
    approved_at: AwareDatetime = Field(description="When, with a time zone; stored in UTC.")
    note: str = Field(
        default="", description="Why (ethics approval number, reason for a forced approval)."
    )
    overridden: tuple[str, ...] = Field(
        default=(),
        description="Refusing rules the officer approved despite (forced, reason in the note).",
    )

    @field_validator("approved_at")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        # One time zone in the file, so entries sort and compare as written.
        return value.astimezone(UTC)


class DatasetBudget(Strict):
    """The total (epsilon, delta) the site allows to be spent on one data set.

    The site's privacy ledger composes every release from the data set with
    ``accountant`` at ``delta`` and refuses a round that would exceed ``epsilon``.
    """

    epsilon: float = Field(gt=0.0, allow_inf_nan=False)
    delta: float = Field(gt=0.0, lt=1.0)
    accountant: AccountantKind = Field(
        default=AccountantKind.RDP, description="How the ledger measures spending: rdp, pld, prv."
    )


class SafeguardMechanism(StrEnum):
    """Legal mechanisms that allow a transfer to a coordinator abroad."""

    ADEQUACY_DECISION = "adequacy_decision"
    STANDARD_CONTRACTUAL_CLAUSES = "standard_contractual_clauses"
    BINDING_CORPORATE_RULES = "binding_corporate_rules"
    CODE_OF_CONDUCT = "code_of_conduct"
    CERTIFICATION = "certification"
    LEGALLY_ENFORCEABLE_OBLIGATIONS = "legally_enforceable_obligations"


class TransferSafeguard(Strict):
    """The officer's record that a transfer abroad rests on a signed, legal basis."""

    mechanism: SafeguardMechanism
    regions: tuple[Region, ...] = Field(
        min_length=1, description="Coordinator regions (ISO codes) the safeguard covers."
    )
    reference: str = Field(
        min_length=1, description="Where the signed instrument is kept (document id, date)."
    )


class SitePolicy(Strict):
    """``policy.yaml``: the site's own rules. Kept at the site; never sent."""

    site: str = Field(pattern=SITE_NAME)
    jurisdiction: Jurisdiction
    region: Region = Field(description="Where the site is (ISO code, e.g. US).")
    min_cohort_size: int = Field(ge=1, description="Smallest group behind any released number.")
    coordinators: tuple[HttpUrl, ...] = Field(
        default=(), description="Coordinators this site may connect to (https only)."
    )
    allowed_artefacts: tuple[Artefact, ...] = Field(
        default=(Artefact.MODEL_UPDATES,),
        description=(
            "What may leave the site: model_updates, metrics, counts, drift_summaries; a "
            "study that sends more is refused."
        ),
    )
    privacy_budget: dict[DatasetName, DatasetBudget] = Field(
        default_factory=dict, description="Per data set, the total (epsilon, delta) allowed."
    )
    transfer_safeguard: TransferSafeguard | None = Field(
        default=None, description="The legal basis for a coordinator outside the site's region."
    )
    validation_gates: tuple[GateSpec, ...] = Field(
        default=(),
        description="This site's own release gates, checked with the study's on its data.",
    )
    # Last, because fedcare appends to it and the file reads best with it at the end.
    approved_studies: tuple[ApprovedStudy, ...] = Field(
        default=(), description="Studies approved by exact hash; fedcare site approve appends here."
    )

    @field_validator("coordinators")
    @classmethod
    def _https_only(cls, value: tuple[HttpUrl, ...]) -> tuple[HttpUrl, ...]:
        plain = [str(url) for url in value if url.scheme != "https"]
        if plain:
            raise ValueError(f"coordinators must use https, not {', '.join(plain)}")
        if len({normalise_url(str(url)) for url in value}) != len(value):
            raise ValueError("a coordinator is listed twice")
        return value

    @field_validator("allowed_artefacts")
    @classmethod
    def _distinct_artefacts(cls, value: tuple[Artefact, ...]) -> tuple[Artefact, ...]:
        if len(set(value)) != len(value):
            raise ValueError("an artefact is listed twice")
        return value

    @field_validator("approved_studies")
    @classmethod
    def _distinct_hashes(cls, value: tuple[ApprovedStudy, ...]) -> tuple[ApprovedStudy, ...]:
        hashes = [entry.hash for entry in value]
        repeated = sorted({h for h in hashes if hashes.count(h) > 1})
        if repeated:
            raise ValueError(f"study hash approved twice: {', '.join(repeated)}")
        return value

    def approval(self, study_hash: str) -> ApprovedStudy | None:
        """The approval entry for exactly this hash, if there is one."""
        return next((entry for entry in self.approved_studies if entry.hash == study_hash), None)

    def allows_coordinator(self, url: str) -> bool:
        """Whether ``url`` is one of the listed coordinators (scheme, host, port and path)."""
        wanted = normalise_url(url)
        return any(normalise_url(str(allowed)) == wanted for allowed in self.coordinators)


def normalise_url(url: str) -> str:
    """A URL in a form where equal coordinators compare equal (case, default port, slash)."""
    parsed = HttpUrl(url)
    port = "" if parsed.port in (None, 443 if parsed.scheme == "https" else 80) else parsed.port
    host = (parsed.host or "").lower()
    path = (parsed.path or "").rstrip("/")
    return f"{parsed.scheme}://{host}{':' if port else ''}{port}{path}"


def parse_policy(text: str, source: str = "<policy>") -> SitePolicy:
    """Parse and validate a site policy from YAML text."""
    return parse_yaml_model(text, SitePolicy, source, "site policy", PolicyError)


def load_policy(path: Path) -> SitePolicy:
    """Read and validate ``policy.yaml``."""
    return read_yaml_model(path, SitePolicy, "site policy", PolicyError)


_HEADER = (
    "# fedcare site policy: kept at this site and never sent.\n"
    "# fedcare appends approvals to this file as written; any other change it makes\n"
    "# rewrites the file in this style. Put reasons in the 'note' of an approval.\n"
    "# See docs/reference/policy.md and docs/governance.md.\n"
)


def dump_policy(policy: SitePolicy) -> str:
    """The policy as YAML text, in field order, without unset optional sections."""
    data = policy.model_dump(mode="json", exclude_none=True)
    return _HEADER + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _approval_lines(entries: Sequence[ApprovedStudy], indent: str) -> list[str]:
    data = [e.model_dump(mode="json", exclude_defaults=True) for e in entries]
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return [indent + line for line in text.splitlines()]


def _with_approvals(text: str, entries: Sequence[ApprovedStudy]) -> str:
    """``text`` with ``entries`` added to its ``approved_studies`` list, every other
    line (comments, quoting, order) as the officer wrote it."""
    lines = text.splitlines()
    key = next((i for i, line in enumerate(lines) if re.match(r"approved_studies\s*:", line)), None)
    if key is None:
        return "\n".join([*lines, "approved_studies:", *_approval_lines(entries, "  ")]) + "\n"
    if re.fullmatch(r"approved_studies\s*:\s*\[\s*\]\s*(#.*)?", lines[key]):
        lines[key] = "approved_studies:"
        return (
            "\n".join([*lines[: key + 1], *_approval_lines(entries, "  "), *lines[key + 1 :]])
            + "\n"
        )
    end = key + 1
    indent = "  "
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#-"):
        if lines[end].lstrip().startswith("- ") and end == key + 1:
            indent = lines[end][: len(lines[end]) - len(lines[end].lstrip())]
        end += 1
    # Blank lines and column-0 comments after the last item stay after the new ones.
    while end > key + 1 and (not lines[end - 1].strip() or lines[end - 1].startswith("#")):
        end -= 1
    new = _approval_lines(entries, indent)
    return "\n".join([*lines[:end], *new, *lines[end:]]) + "\n"


def policy_text(policy: SitePolicy, previous: str | None) -> str:
    """The text to write for ``policy``. When it only adds approvals to the policy in
    ``previous``, those are appended to that text, so the officer's comments and
    style stay; otherwise (or if the append would not read back as ``policy``) the
    whole policy is written in fedcare's style."""
    if previous is not None:
        try:
            old = parse_policy(previous)
        except PolicyError:
            old = None
        count = 0 if old is None else len(old.approved_studies)
        if (
            old is not None
            and policy.approved_studies[:count] == old.approved_studies
            and policy.model_copy(update={"approved_studies": old.approved_studies}) == old
        ):
            added = policy.approved_studies[count:]
            text = _with_approvals(previous, added) if added else previous
            try:
                if parse_policy(text) == policy:
                    return text
            except PolicyError:
                pass
    return dump_policy(policy)


def save_policy(policy: SitePolicy, path: Path) -> None:
    """Write the policy atomically: a reader sees the old file or the new one, never half.

    A change that only adds approvals keeps the existing file's text and appends
    them (:func:`policy_text`).

    The text goes to a temporary file in the same folder (same file system, so the
    rename is atomic), is flushed to disk, and replaces ``path`` with ``os.replace``.
    An existing file's permissions are kept; a new file is readable by its owner only.
    """
    try:
        previous: str | None = path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        previous = None
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the site policy: {exc.strerror}") from exc
    text = policy_text(policy, previous)
    folder = path.resolve().parent
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    try:
        handle, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot write the site policy: {exc.strerror}") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        tmp.chmod(mode)
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise PolicyError(f"{path}: cannot write the site policy: {exc.strerror}") from exc
