"""Built-in data: the demo study and its synthetic hospital cohorts."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fedcare.study import Study, load_study


def demo_study_path() -> Path:
    """The packaged early-warning study file."""
    return Path(str(files("fedcare.data").joinpath("studies/early_warning.yaml")))


def demo_study() -> Study:
    """The packaged early-warning study, validated."""
    return load_study(demo_study_path())
