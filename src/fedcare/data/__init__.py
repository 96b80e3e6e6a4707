"""Built-in data: the demo study and its synthetic hospital cohorts."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fedcare.study import Study, load_study


def demo_study_path() -> Path:
    """The packaged early-warning study file."""
    return Path(str(files("fedcare.data").joinpath("studies/early_warning.yaml")))


def imaging_study_path() -> Path:
    """The packaged lesion-detection study file (the imaging cohort's)."""
    return Path(str(files("fedcare.data").joinpath("studies/imaging.yaml")))


def imaging_study() -> Study:
    """The packaged lesion-detection study, validated."""
    return load_study(imaging_study_path())


def template_text(name: str) -> str:
    """The text of the packaged template ``name`` (study, mapping, site, policy, sites,
    coordinator): what ``fedcare init`` writes and docs/reference/ ends with."""
    return files("fedcare.data").joinpath("templates", f"{name}.yaml").read_text("utf-8")


def demo_study() -> Study:
    """The packaged early-warning study, validated."""
    return load_study(demo_study_path())
