"""The file reference cannot drift: docs/reference/ is regenerated from the models and
compared, every field says what it means, and every template validates as written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.config import CoordinatorConfig, SiteConfig
from fedcare.data import demo_study
from fedcare.policy.model import load_policy
from fedcare.report.reference import generate, pages
from fedcare.schema.mapping import check_mapping, load_mapping
from fedcare.simulation.sites import SitesFile
from fedcare.sources.extract import conversions
from fedcare.sources.mapping import load_extract_mapping
from fedcare.study import load_study

DOCS = Path(__file__).resolve().parents[1] / "docs" / "reference"


def test_the_committed_reference_matches_the_code() -> None:
    expected = generate()
    committed = {p.name: p.read_text(encoding="utf-8") for p in DOCS.glob("*.md")}
    stale = sorted(name for name in expected if committed.get(name) != expected[name])
    extra = sorted(set(committed) - set(expected))
    fix = "run `python -m fedcare.report.reference docs/reference`"
    assert not stale, f"docs/reference is stale: {stale}; {fix}"
    assert not extra, f"docs/reference has pages no model describes: {extra}"


@pytest.mark.parametrize("name", sorted(generate()))
def test_every_field_says_what_it_means(name: str) -> None:
    undocumented = [
        line
        for line in generate()[name].splitlines()
        if line.startswith("| `") and line.endswith("|  |")
    ]
    assert undocumented == [], f"{name}: fields without a description: {undocumented}"


def _validate(kind: str, path: Path) -> None:
    if kind == "study":
        load_study(path)
    elif kind == "mapping":
        study = load_study(
            Path(__file__).resolve().parents[1] / "src/fedcare/data/templates/study.yaml"
        )
        check_mapping(load_mapping(path), study.feature_schema)
    elif kind == "source-mapping":
        # Written for the demo early-warning study: its units convert to that schema's.
        conversions(load_extract_mapping(path), demo_study().feature_schema)
    elif kind == "policy":
        load_policy(path)
    else:
        model = {"site": SiteConfig, "coordinator": CoordinatorConfig, "sites": SitesFile}[kind]
        model.model_validate(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize("kind", [p.file.removesuffix(".yaml") for p in pages()])
def test_init_writes_a_template_that_validates_and_refuses_to_overwrite(
    kind: str, tmp_path: Path
) -> None:
    runner = CliRunner()
    target = tmp_path / f"{kind}.yaml"
    result = runner.invoke(app, ["init", kind, "--out", str(target)])
    assert result.exit_code == 0, result.output
    assert target.read_text().startswith("#")  # commented
    _validate(kind, target)
    target.write_text("mine")
    again = runner.invoke(app, ["init", kind, "--out", str(target)])
    assert again.exit_code == 2
    assert "exists; pass --force" in again.output
    assert target.read_text() == "mine"
    forced = runner.invoke(app, ["init", kind, "--out", str(target), "--force"])
    assert forced.exit_code == 0
    _validate(kind, target)


def test_the_template_mapping_fits_the_template_study_on_data() -> None:
    # The two templates belong together: a table in the mapping's shape passes.
    import pandas as pd

    from fedcare.schema.mapping import apply_mapping

    root = Path(__file__).resolve().parents[1] / "src/fedcare/data/templates"
    study = load_study(root / "study.yaml")
    frame = pd.DataFrame(
        {
            "AGE": ["54", "61"],
            "SEX": ["F", "M"],
            "TSH_mU_L": ["2.1", "-999"],
            "T3": ["130", "95"],
            "REF_SRC": ["SVHC", "other"],
            "DIAG": ["negative", "hypo"],
            "REGION": ["N", "S"],
        }
    )
    mapped = apply_mapping(frame, load_mapping(root / "mapping.yaml"), study.feature_schema).frame
    assert mapped["t3"].iloc[0] == pytest.approx(130 * 10 / 650.98, rel=1e-9)  # ng/dL to nmol/L
    assert mapped["tsh"].isna().tolist() == [False, True]  # -999 is a missing token
    assert mapped["dysfunction"].tolist() == [0, 1]
