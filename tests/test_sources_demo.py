"""The demo hospitals from FHIR exports and OMOP databases: the same model as from CSV,
through sites.yaml, `fedcare data check` and site agents over mutual TLS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.config import SiteConfig, load_config, write_config
from fedcare.data import demo_study
from fedcare.data.exports import write_exports
from fedcare.data.synthetic import HospitalCohort, generate_cohorts
from fedcare.federation.messages import decode_model
from fedcare.models.size import study_parameter_count
from fedcare.simulation.loopback import (
    free_port,
    prepare_deployment,
    start_coordinator,
    start_site,
    stop,
    wait_until_serving,
)
from fedcare.simulation.runner import run_federation
from fedcare.simulation.sites import sites_from_file
from fedcare.site.dataset import prepare_site_data
from fedcare.study import Study

FROM_FHIR = ("riverside", "ashby-general")  # degF and mg/dL; local lab codes first
FROM_OMOP = ("kestrel-renal",)


def three_hospitals() -> list[HospitalCohort]:
    return [c for c in generate_cohorts(scale=0.1) if c.name in FROM_FHIR + FROM_OMOP]


def mixed_sites(folder: Path, cohorts: list[HospitalCohort]) -> Path:
    """One sites.yaml: two hospitals read from FHIR exports, one from an OMOP database."""
    fhir = yaml.safe_load(
        write_exports(
            [c for c in cohorts if c.name in FROM_FHIR], "fhir", folder / "fhir"
        ).read_text()
    )
    omop = yaml.safe_load(
        write_exports(
            [c for c in cohorts if c.name in FROM_OMOP], "omop", folder / "omop"
        ).read_text()
    )
    entries = []
    for sub, parsed in (("fhir", fhir), ("omop", omop)):
        for entry in parsed["sites"]:
            source = dict(entry["source"])
            if source["kind"] == "fhir":
                source["path"] = f"{sub}/{source['path']}"
            else:
                source["url"] = f"sqlite:///{sub}/{source['url'].removeprefix('sqlite:///')}"
            entries.append({**entry, "source": source, "mapping": f"{sub}/{entry['mapping']}"})
    sites = folder / "sites.yaml"
    sites.write_text(yaml.safe_dump({"sites": entries}))
    return sites


def csv_sites(folder: Path, cohorts: list[HospitalCohort]) -> Path:
    entries = []
    for cohort in cohorts:
        cohort.frame.to_csv(folder / f"{cohort.name}.csv", index=False)
        (folder / f"{cohort.name}.yaml").write_text(
            yaml.safe_dump(cohort.mapping.model_dump(mode="json"))
        )
        entries.append(
            {"name": cohort.name, "data": f"{cohort.name}.csv", "mapping": f"{cohort.name}.yaml"}
        )
    sites = folder / "sites.yaml"
    sites.write_text(yaml.safe_dump({"sites": entries}))
    return sites


def test_two_hospitals_from_fhir_and_one_from_omop_train_the_csv_model(tmp_path: Path) -> None:
    """Identical training data (fingerprints over inputs, labels and preprocessing), and
    with secure aggregation on, bit-identical models. DP is off here only because its noise
    is drawn afresh on every run by design, so two DP runs never agree, even from one CSV."""
    base = demo_study()
    study = base.replace(rounds={**base.canonical()["rounds"], "count": 3}, privacy={"dp": False})
    cohorts = three_hospitals()
    (tmp_path / "csv").mkdir()
    from_sources, _ = sites_from_file(mixed_sites(tmp_path / "src", cohorts), study)
    from_csv, _ = sites_from_file(csv_sites(tmp_path / "csv", cohorts), study)
    order = {s.name: s for s in from_csv}
    from_csv = [order[s.name] for s in from_sources]
    assert [s.name for s in from_sources] == [*FROM_FHIR, *FROM_OMOP]
    for mine, theirs in zip(from_sources, from_csv, strict=True):
        assert mine.fingerprint == theirs.fingerprint, mine.name
    model = run_federation(study, from_sources).params
    reference = run_federation(study, from_csv).params
    assert np.array_equal(model, reference)
    assert np.any(model != 0)


def test_data_check_reports_unmapped_codes_and_refuses_foreign_units(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["demo", "--export", "fhir", str(tmp_path), "--scale", "0.1"])
    assert result.exit_code == 0, result.output
    study = tmp_path / "study.yaml"
    check = runner.invoke(
        app,
        [
            "data",
            "check",
            str(tmp_path / "riverside"),
            "--study",
            str(study),
            "--mapping",
            str(tmp_path / "riverside.mapping.yaml"),
        ],
    )
    assert check.exit_code == 0, check.output
    said = " ".join(check.output.split())
    assert (
        "Observation: code http://loinc.org|29463-7 is not mapped: ignored (900 resources)" in said
    )
    assert "ok 900 rows fit the schema" in said
    # The hospital's lab starts sending temperatures in Kelvin for three patients.
    observations = tmp_path / "riverside" / "Observation.ndjson"
    text = observations.read_text().replace(
        '"unit":"[degF]","system":"http://unitsofmeasure.org","code":"[degF]"',
        '"unit":"K","system":"http://unitsofmeasure.org","code":"K"',
        3,
    )
    observations.write_text(text)
    refused = runner.invoke(
        app, ["data", "check", "--sites", str(tmp_path / "sites.yaml"), "--study", str(study)]
    )
    assert refused.exit_code != 0
    assert (
        "temperature: unit 'K' is not among the mapped units ['[degF]'] (3 resources)"
        in " ".join(refused.output.split())
    )
    assert "Traceback" not in refused.output


def network_study() -> Study:
    base = demo_study()
    return base.replace(
        rounds={**base.canonical()["rounds"], "count": 2},
        privacy={"dp": False},
        secure_aggregation={"enabled": False},
    )


@pytest.mark.slow
def test_site_agents_run_from_fhir_and_omop_sources_with_a_coordinator_without_torch(
    tmp_path: Path,
) -> None:
    study = network_study()
    cohorts = three_hospitals()
    deployment = prepare_deployment(tmp_path / "net", study, cohorts, free_port())
    exports = tmp_path / "exports"
    for cohort in cohorts:
        kind = "fhir" if cohort.name in FROM_FHIR else "omop"
        site_dir = deployment.site_configs[cohort.name].parent
        write_exports([cohort], kind, exports / cohort.name)
        config = load_config(deployment.site_configs[cohort.name], SiteConfig)
        if kind == "fhir":
            source = {"kind": "fhir", "path": str(exports / cohort.name / cohort.name)}
        else:
            source = {
                "kind": "omop",
                "url": f"sqlite:///{exports / cohort.name / f'{cohort.name}.omop.sqlite'}",
            }
        (site_dir / "data.csv").unlink()
        mapping = exports / cohort.name / f"{cohort.name}.mapping.yaml"
        fields = {**config.model_dump(mode="json"), "data": None, "mapping": str(mapping)}
        write_config(
            SiteConfig.model_validate({**fields, "source": source}),
            deployment.site_configs[cohort.name],
        )
    coordinator = start_coordinator(deployment)
    try:
        wait_until_serving(deployment, cohorts[0].name)
        sites = [start_site(deployment, c.name) for c in cohorts]
        for proc in sites:
            assert proc.popen.wait(timeout=300) == 0, proc.log.read_text()[-3000:]
        # The coordinator ran the study (an MLP's round 0 included) without loading the
        # numerical libraries a site trains with: none of their shared objects is mapped.
        mapped = Path(f"/proc/{coordinator.popen.pid}/maps").read_text()
        assert "/numpy/" in mapped  # the map lists Python's extension modules: it can tell
        for library in ("libtorch", "/pandas/", "/sklearn/", "/scipy/"):
            assert library not in mapped, f"the coordinator loaded {library}"
    finally:
        for proc in reversed(deployment.procs):
            stop(proc)
    reference = run_federation(
        study, [prepare_site_data(c.frame, c.mapping, study) for c in cohorts]
    ).params
    for cohort in cohorts:
        model_file = (
            deployment.site_configs[cohort.name].parent
            / "state"
            / f"model-{study.content_hash[:16]}.safetensors"
        )
        _, params, _ = decode_model(model_file.read_bytes(), study_parameter_count(study))
        assert np.allclose(params, reference, atol=1e-6), cohort.name


def test_data_check_reads_the_source_a_site_config_names(tmp_path: Path) -> None:
    write_exports(three_hospitals()[2:], "omop", tmp_path)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(demo_study().canonical()))
    config = {
        "site": "kestrel-renal",
        "coordinator": "https://127.0.0.1:8443",
        "tls": {"cert": "k.crt", "key": "k.key", "ca": "ca.crt"},
        "study": "study.yaml",
        "source": {"kind": "omop", "url": "sqlite:///kestrel-renal.omop.sqlite"},
        "mapping": "kestrel-renal.mapping.yaml",
    }
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(config))
    runner = CliRunner()
    result = runner.invoke(app, ["data", "check", "--config", str(tmp_path / "site.yaml")])
    assert result.exit_code == 0, result.output
    assert "ok 120 rows fit the schema" in " ".join(result.output.split())
    both = {**config, "data": "x.csv"}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(both))
    refused = runner.invoke(app, ["data", "check", "--config", str(tmp_path / "site.yaml")])
    assert refused.exit_code == 2
    assert "give data (a table file) or source, not both" in refused.output
