"""Where a simulation's sites come from: a sites file, or the built-in cohorts."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedcare.data.imaging import ImagingSite, write_imaging_cohorts
from fedcare.data.synthetic import HospitalCohort, generate_cohorts
from fedcare.policy.model import load_policy
from fedcare.privacy.dp.budget import Budget
from fedcare.schema.readers import read_table
from fedcare.simulation.preparation import SiteFiles, SitesFileError, prepare_all
from fedcare.simulation.rules import SiteRules
from fedcare.site.dataset import SiteDataset, prepare_site_data
from fedcare.sources.spec import Source, TableSource
from fedcare.study import Study
from fedcare.validation_spec import GateKind, GateSpec, Metric
from fedcare.yamlfile import read_yaml_model

BUILTIN_MIN_COHORT = 11
"""The built-in hospitals' minimum cohort size (their policies follow HIPAA's small-cell rule)."""

BUILTIN_BUDGETS: dict[str, Budget] = {
    # Each hospital's privacy officer set its own budget for its admissions data set.
    "northgate": Budget(8.0, 1e-5),
    "riverside": Budget(6.0, 1e-5),
    "ashby-general": Budget(8.0, 1e-5),
    "kestrel-renal": Budget(5.0, 1e-5),
    "fellside-cottage": Budget(6.0, 1e-5),
}
"""The built-in hospitals' privacy budgets (epsilon, delta per data set, RDP)."""

BUILTIN_SITE_GATES: dict[str, tuple[GateSpec, ...]] = {
    # The renal unit's clinicians accept a model only if it catches at least 70 %
    # of their deteriorating patients at the study's threshold.
    "kestrel-renal": (
        GateSpec(kind=GateKind.OVERALL, metric=Metric.SENSITIVITY, op=">=", threshold=0.70),
    ),
    # riverside checks that women are not missed more often than it tolerates.
    "riverside": (
        GateSpec(
            kind=GateKind.EVERY_SUBGROUP,
            metric=Metric.SENSITIVITY,
            op=">=",
            threshold=0.60,
            attribute="sex_female",
            min_positives=20,
        ),
    ),
}
"""The validation gates in the built-in hospitals' own policies (the demo's)."""


class SiteEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    data: Path | None = Field(
        default=None,
        description="The site's data file (CSV or Parquet): short for source: {kind: table, path}.",
    )
    source: Source | None = Field(
        default=None,
        description="Where the site's rows come from: {kind: table, path}, {kind: fhir, path} "
        "or {kind: omop, url}; paths and SQLite files relative to the sites file.",
    )
    mapping: Path = Field(description="The site's mapping.yaml.")
    description: str = Field(default="", description="A line about the site, shown in reports.")
    policy: Path | None = Field(
        default=None, description="The site's policy.yaml: its own gates and minimum cohort."
    )

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.data is None) == (self.source is None):
            raise ValueError("give data (a table file) or source, exactly one")
        return self

    def data_source(self, base: Path) -> Source:
        """The site's source, relative paths resolved against the sites file's folder."""
        source = self.source if self.source is not None else TableSource(path=Path(self.data or ""))
        return source.beside(base)


class SitesFile(BaseModel):
    """``sites.yaml``: one entry per simulated site; paths are relative to the file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sites: list[SiteEntry] = Field(min_length=1)


def load_sites_file(path: Path) -> SitesFile:
    parsed = read_yaml_model(path, SitesFile, "sites file", SitesFileError)
    names = [s.name for s in parsed.sites]
    if len(set(names)) != len(names):
        raise SitesFileError(f"{path}: site names must be unique")
    return parsed


def rules_from_file(path: Path) -> dict[str, SiteRules]:
    """Each listed site's validation rules, and the privacy budget its policy sets for the
    data set it reads (named after the data file, as a site agent names it)."""
    parsed = load_sites_file(path)
    rules = {}
    for entry in parsed.sites:
        if entry.policy is not None:
            policy = load_policy(path.parent / entry.policy)
            allowed = policy.privacy_budget.get(entry.data_source(path.parent).dataset_name)
            budget = (
                None
                if allowed is None
                else Budget(allowed.epsilon, allowed.delta, allowed.accountant)
            )
            rules[entry.name] = SiteRules(policy.validation_gates, policy.min_cohort_size, budget)
    return rules


def builtin_gates(name: str, study: Study | None = None) -> tuple[GateSpec, ...]:
    """A built-in hospital's own gates for ``study``: a subgroup gate only when the study
    reports that subgroup (riverside's gate on women is about the early-warning study's
    sex_female; an imaging study reporting 'sex' would fail it as uncheckable)."""
    gates = BUILTIN_SITE_GATES.get(name, ())
    if study is None:
        return gates
    reported = set(study.validation.subgroups)
    return tuple(g for g in gates if g.attribute is None or g.attribute in reported)


def builtin_rules(names: Sequence[str], study: Study | None = None) -> dict[str, SiteRules]:
    """The built-in hospitals' validation rules (for ``study``, see :func:`builtin_gates`)
    and privacy budgets."""
    return {
        name: SiteRules(
            builtin_gates(name, study),
            BUILTIN_MIN_COHORT,
            BUILTIN_BUDGETS.get(name),
        )
        for name in names
    }


def sites_from_file(
    path: Path, study: Study, processes: int | None = None
) -> tuple[list[SiteDataset], dict[str, str]]:
    """Read, map and prepare every site in a sites file (over the cores when there are
    many: :func:`fedcare.simulation.preparation.prepare_all`)."""
    parsed = load_sites_file(path)
    base = path.parent
    files = [SiteFiles(e.name, e.data_source(base), base / e.mapping) for e in parsed.sites]
    try:
        sites = prepare_all(study, files, processes)
    except SitesFileError as exc:
        raise SitesFileError(f"{path}: {exc}") from None
    return sites, {s.name: s.description for s in parsed.sites}


Cohort = HospitalCohort | ImagingSite
"""A built-in hospital: a table (written as data.csv) or an image folder (copied as data/)."""


def builtin_cohorts(study: Study, data_seed: int, scale: float, folder: Path) -> list[Cohort]:
    """The built-in hospitals for ``study``: the imaging cohort (written under ``folder``)
    for a study with an image feature, else the tabular cohorts."""
    if study.feature_schema.image is not None:
        return list(write_imaging_cohorts(folder, seed=data_seed, scale=scale))
    return list(generate_cohorts(seed=data_seed, scale=scale))


def prepare_cohort(cohort: Cohort, study: Study) -> SiteDataset:
    """A built-in hospital's data prepared for ``study``, as its site reads it."""
    if isinstance(cohort, ImagingSite):
        return prepare_site_data(read_table(cohort.folder), cohort.mapping, study)
    return prepare_site_data(cohort.frame, cohort.mapping, study)


def builtin_sites(
    study: Study, seed: int, scale: float = 1.0
) -> tuple[list[SiteDataset], dict[str, str]]:
    """The built-in hospitals prepared for ``study``; the imaging cohort's image folders
    are written to a scratch folder and read as a site reads them."""
    with tempfile.TemporaryDirectory(prefix="fedcare-cohorts-") as root:
        cohorts = builtin_cohorts(study, seed, scale, Path(root))
        sites = [prepare_cohort(c, study) for c in cohorts]
    return sites, {c.name: c.description for c in cohorts}
