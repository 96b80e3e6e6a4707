"""Site policy, jurisdiction profiles, study review and approval (docs/governance.md)."""

from __future__ import annotations

import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.data import demo_study
from fedcare.data._profiles import PROFILES
from fedcare.data.synthetic import site_mapping
from fedcare.policy import (
    Basis,
    Jurisdiction,
    PolicyError,
    Severity,
    SitePolicy,
    StudyRefusedError,
    approve,
    check_study,
    count_parameters,
    ensure_allowed,
    is_approved,
    load_policy,
    load_profile,
    parse_policy,
    review_study,
    save_policy,
)
from fedcare.study import Study

runner = CliRunner()
COORDINATOR = "https://coordinator.example.org:8443"
WHEN = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


def policy_data(jurisdiction: str = "hipaa", **changes: Any) -> dict[str, Any]:
    regions = {"hipaa": "US", "gdpr": "DE", "pdpa": "SG"}
    data: dict[str, Any] = {
        "site": "northgate",
        "jurisdiction": jurisdiction,
        "region": regions.get(jurisdiction, "US"),
        "min_cohort_size": 5,
        "coordinators": [COORDINATOR],
        "allowed_artefacts": ["model_updates", "metrics", "counts"],
        "privacy_budget": {"admissions": {"epsilon": 8.0, "delta": 1e-5}},
    }
    return {**data, **changes}


def make_policy(jurisdiction: str = "hipaa", **changes: Any) -> SitePolicy:
    return SitePolicy.model_validate(policy_data(jurisdiction, **changes))


def variant(study: Study, path: str, value: Any) -> Study:
    """The study with one setting (a dotted path into its canonical form) changed."""
    data = study.canonical()
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = value
    return Study.model_validate(data)


def disclosed(study: Study, **disclosure: Any) -> Study:
    return study.replace(disclosure={**study.canonical()["disclosure"], **disclosure})


@pytest.fixture
def study() -> Study:
    """The demo study, made acceptable to a US (HIPAA) site: cohort minimum 11, US coordinator."""
    return disclosed(demo_study(), min_cohort_size=11, coordinator_region="US")


def rule_ids(findings: list[Any], severity: Severity = Severity.REFUSE) -> list[str]:
    return [f.rule_id for f in findings if f.severity is severity]


def write_policy(tmp_path: Path, jurisdiction: str = "hipaa", **changes: Any) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy_data(jurisdiction, **changes)), encoding="utf-8")
    return path


# --- the policy file ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"min_cohort": 3}, "min_cohort"),
        ({"jurisdiction": "ccpa"}, "jurisdiction"),
        ({"region": "Germany"}, "region"),
        ({"min_cohort_size": 0}, "min_cohort_size"),
        ({"coordinators": ["http://coordinator.example.org"]}, "coordinators"),
        ({"allowed_artefacts": ["model_updates", "images"]}, "allowed_artefacts.1"),
        ({"privacy_budget": {"icu": {"epsilon": 1.0, "delta": 1.5}}}, "privacy_budget.icu.delta"),
        ({"privacy_budget": {"icu": {"epsilon": 0, "delta": 1e-5}}}, "privacy_budget.icu.epsilon"),
        (
            {
                "approved_studies": [
                    {
                        "hash": "abc",
                        "name": "x",
                        "approved_by": "A",
                        "approved_at": "2026-01-01T00:00:00Z",
                    }
                ]
            },
            "approved_studies.0.hash",
        ),
        (
            {
                "approved_studies": [
                    {
                        "hash": "a" * 64,
                        "name": "x",
                        "approved_by": "A",
                        "approved_at": "2026-01-01T00:00:00",
                    }
                ]
            },
            "approved_studies.0.approved_at",
        ),
        (
            {
                "validation_gates": [
                    {"kind": "overall", "metric": "auroc", "op": ">=", "threshold": 0.7, "level": 1}
                ]
            },
            "validation_gates.0.level",
        ),
        (
            {
                "validation_gates": [
                    {"kind": "overall", "metric": "brier", "op": ">=", "threshold": 0.2}
                ]
            },
            "validation_gates.0",
        ),
        (
            {"transfer_safeguard": {"mechanism": "handshake", "regions": ["US"], "reference": "x"}},
            "transfer_safeguard.mechanism",
        ),
    ],
)
def test_policy_errors_name_the_field(change: dict[str, Any], field: str) -> None:
    text = yaml.safe_dump(policy_data(**change))
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "policy.yaml")
    message = str(caught.value)
    assert f"  {field}:" in message, message
    assert message.startswith("policy.yaml: the site policy does not validate")


def test_unknown_key_is_refused_not_ignored() -> None:
    with pytest.raises(PolicyError, match=r"coordinator: unknown key"):
        parse_policy(yaml.safe_dump(policy_data(coordinator=COORDINATOR)))


def test_policy_round_trips_and_saves_atomically(tmp_path: Path) -> None:
    policy = make_policy(
        validation_gates=[
            {
                "kind": "every_subgroup",
                "metric": "auroc",
                "op": ">=",
                "threshold": 0.7,
                "attribute": "ethnicity",
            }
        ],
        transfer_safeguard={
            "mechanism": "standard_contractual_clauses",
            "regions": ["US"],
            "reference": "DPA-2026-04, signed 2026-04-01",
        },
    )
    path = tmp_path / "policy.yaml"
    save_policy(policy, path)
    assert load_policy(path) == policy
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o640)
    save_policy(policy, path)  # replaces the file, keeping its permissions
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["policy.yaml"]  # no temporary left


def test_approval_times_are_stored_in_utc() -> None:
    entry = {
        "hash": "a" * 64,
        "name": "x",
        "approved_by": "A",
        "approved_at": "2026-01-01T08:00:00+08:00",
    }
    policy = make_policy(approved_studies=[entry])
    assert policy.approved_studies[0].approved_at == datetime(2026, 1, 1, 0, 0, tzinfo=UTC)


def test_unreadable_policy_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(PolicyError, match="mapping of settings"):
        load_policy(tmp_path / "list.yaml")


# --- profiles -------------------------------------------------------------------------------


@pytest.mark.parametrize("jurisdiction", list(Jurisdiction))
def test_profiles_load_and_every_rule_cites_a_source(jurisdiction: Jurisdiction) -> None:
    profile = load_profile(jurisdiction)
    assert profile.jurisdiction is jurisdiction
    for rule in profile.rules:
        assert rule.id.startswith(jurisdiction.value.upper() + "-")
        assert rule.source
        assert rule.statement
    # The audit module reads this: six years under every shipped profile.
    assert profile.audit_retention_days == 2192
    # No law states a minimum cohort size: the number is labelled as fedcare's own.
    assert profile.cohort_rule.basis is Basis.FEDCARE_DEFAULT


def test_check_refuses_a_profile_for_another_jurisdiction(study: Study) -> None:
    with pytest.raises(PolicyError, match="under hipaa"):
        check_study(study, make_policy("hipaa"), load_profile("gdpr"))


# --- rules ----------------------------------------------------------------------------------


def test_acceptable_study_has_no_refusals(study: Study) -> None:
    findings = check_study(study, make_policy("hipaa"), load_profile("hipaa"), COORDINATOR)
    assert rule_ids(findings) == []
    # The demo lets age run to 110: Safe Harbor's 90-and-over rule is a warning.
    assert rule_ids(findings, Severity.WARN) == ["HIPAA-AGE-1"]


def test_pdpa_site_refuses_counts_below_its_minimum(study: Study) -> None:
    small = disclosed(study, artefacts=["model_updates", "counts"], min_cohort_size=10)
    policy = make_policy("pdpa")
    profile = load_profile("pdpa")
    findings = check_study(disclosed(small, coordinator_region="SG"), policy, profile)
    (finding,) = [f for f in findings if f.severity is Severity.REFUSE]
    assert finding.rule_id == "PDPA-COHORT-1"
    assert "Guide to Basic Anonymisation" in finding.source
    assert "as small as 10" in finding.message
    assert "at least 11" in finding.message
    big_enough = disclosed(small, coordinator_region="SG", min_cohort_size=11)
    assert rule_ids(check_study(big_enough, policy, profile)) == []


def test_site_minimum_above_the_profile_names_the_site_rule(study: Study) -> None:
    findings = check_study(study, make_policy(min_cohort_size=25), load_profile("hipaa"))
    assert rule_ids(findings) == ["SITE-COHORT"]
    assert "at least 25" in findings[0].message


@pytest.mark.parametrize(
    ("region", "refused"),
    [("DE", False), ("EU", False), ("NO", False), ("JP", False), ("US", True), ("CN", True)],
)
def test_gdpr_coordinator_location(study: Study, region: str, refused: bool) -> None:
    findings = check_study(
        disclosed(study, coordinator_region=region), make_policy("gdpr"), load_profile("gdpr")
    )
    assert ("GDPR-TRANSFER-1" in rule_ids(findings)) is refused


def test_gdpr_transfer_outside_eu_needs_a_recorded_safeguard(study: Study) -> None:
    profile = load_profile("gdpr")
    without = check_study(study, make_policy("gdpr"), profile)  # coordinator in US
    (finding,) = [f for f in without if f.rule_id == "GDPR-TRANSFER-1"]
    assert finding.severity is Severity.REFUSE
    assert "Art. 46" in finding.source

    def with_safeguard(mechanism: str, regions: list[str]) -> list[str]:
        safeguard = {"mechanism": mechanism, "regions": regions, "reference": "SCC 2026-04"}
        policy = make_policy("gdpr", transfer_safeguard=safeguard)
        return rule_ids(check_study(study, policy, profile))

    assert with_safeguard("standard_contractual_clauses", ["US"]) == []
    assert with_safeguard("standard_contractual_clauses", ["CN"]) == ["GDPR-TRANSFER-1"]
    # A mechanism of another law (PDPA's) does not satisfy the GDPR rule.
    assert with_safeguard("legally_enforceable_obligations", ["US"]) == ["GDPR-TRANSFER-1"]


def test_transfer_cannot_be_assessed_without_a_declared_region(study: Study) -> None:
    findings = check_study(
        disclosed(study, coordinator_region=None), make_policy("gdpr"), load_profile("gdpr")
    )
    (finding,) = [f for f in findings if f.rule_id == "GDPR-TRANSFER-1"]
    assert "coordinator_region" in finding.message


def test_pdpa_coordinator_outside_singapore_needs_a_safeguard(study: Study) -> None:
    profile = load_profile("pdpa")
    assert rule_ids(check_study(study, make_policy("pdpa"), profile)) == ["PDPA-TRANSFER-1"]
    safeguard = {
        "mechanism": "legally_enforceable_obligations",
        "regions": ["US"],
        "reference": "data transfer agreement 2026-07",
    }
    policy = make_policy("pdpa", transfer_safeguard=safeguard)
    findings = check_study(study, policy, profile)
    assert rule_ids(findings) == []
    assert "PDPA-TRANSFER-1" in rule_ids(findings, Severity.WARN)


def test_artefacts_the_site_does_not_allow_are_refused(study: Study) -> None:
    chatty = disclosed(study, artefacts=["model_updates", "metrics", "counts"])
    policy = make_policy(allowed_artefacts=["model_updates"])
    findings = check_study(chatty, policy, load_profile("hipaa"))
    assert rule_ids(findings) == ["SITE-ARTEFACTS"]
    assert "metrics, counts" in findings[0].message


def test_unlisted_or_plain_http_coordinators_are_refused(study: Study) -> None:
    policy, profile = make_policy(), load_profile("hipaa")
    # The same coordinator spelt differently (default port, trailing slash, case) is accepted.
    listed = make_policy(coordinators=["https://Coord.example.org"])
    assert rule_ids(check_study(study, listed, profile, "https://coord.example.org:443/")) == []
    for url in ("https://elsewhere.example.org", "http://coordinator.example.org:8443", "nope"):
        assert rule_ids(check_study(study, policy, profile, url)) == ["SITE-COORDINATOR"]


def _with_column(study: Study, role: str, column: dict[str, Any]) -> Study:
    data = study.canonical()
    data["schema"][role].append(column)
    return Study.model_validate(data)


@pytest.mark.parametrize(
    ("jurisdiction", "role", "column", "rule"),
    [
        ("pdpa", "features", {"name": "nric", "type": "binary"}, "PDPA-IDENT-1"),
        ("gdpr", "attributes", {"name": "patient_name"}, "GDPR-IDENT-1"),
        ("hipaa", "attributes", {"name": "patient_name"}, "HIPAA-DEID-1"),
        ("hipaa", "features", {"name": "admission_date", "type": "binary"}, "HIPAA-DEID-1"),
        ("hipaa", "attributes", {"name": "mrn"}, "HIPAA-DEID-1"),
        ("gdpr", "attributes", {"name": "postcode"}, "GDPR-GEO-1"),
        ("pdpa", "attributes", {"name": "postal_code"}, "PDPA-GEO-1"),
        ("hipaa", "attributes", {"name": "zip"}, "HIPAA-GEO-1"),
        (
            "hipaa",
            "attributes",
            {"name": "zip3", "categories": ["100", "036", "000"]},
            "HIPAA-GEO-1",
        ),
    ],
)
def test_identifier_columns_are_refused(
    study: Study, jurisdiction: str, role: str, column: dict[str, Any], rule: str
) -> None:
    region = {"gdpr": "DE", "pdpa": "SG", "hipaa": "US"}[jurisdiction]
    changed = _with_column(disclosed(study, coordinator_region=region), role, column)
    findings = check_study(changed, make_policy(jurisdiction), load_profile(jurisdiction))
    assert rule_ids(findings) == [rule]
    assert column["name"] in findings[0].message


@pytest.mark.parametrize(
    ("jurisdiction", "role", "column"),
    [
        ("hipaa", "features", {"name": "dosage", "type": "binary"}),  # "age" but not as a word
        ("gdpr", "features", {"name": "dosage", "type": "binary"}),
        ("gdpr", "features", {"name": "birth_year", "reference": [1960, 20]}),
        ("hipaa", "attributes", {"name": "zip3", "categories": ["100", "000"]}),
        ("gdpr", "attributes", {"name": "postcode_district"}),
        ("pdpa", "attributes", {"name": "postal_sector"}),
    ],
)
def test_coarse_or_unrelated_columns_are_not_refused(
    study: Study, jurisdiction: str, role: str, column: dict[str, Any]
) -> None:
    region = {"gdpr": "DE", "pdpa": "SG", "hipaa": "US"}[jurisdiction]
    changed = _with_column(disclosed(study, coordinator_region=region), role, column)
    findings = check_study(changed, make_policy(jurisdiction), load_profile(jurisdiction))
    assert rule_ids(findings) == [], findings


# --- approval -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("training.learning_rate", 0.051),
        ("training.batch_size", 32),
        ("rounds.count", 21),
        ("rounds.min_sites", 2),
        ("aggregation.strategy", "fedadam"),
        ("model.hidden", [17]),
        ("schema.features.0.range", [18, 110]),
        ("schema.features.3.missing", {"rule": "value", "fill": 18}),
        ("preprocessing.holdout_fraction", 0.2),
        ("disclosure.min_cohort_size", 12),
        ("seed", 2027),
    ],
)
def test_one_changed_setting_is_no_longer_approved(
    tmp_path: Path, study: Study, path: str, value: Any
) -> None:
    policy = approve(write_policy(tmp_path), study, by="Dr A. Officer", now=WHEN)
    assert is_approved(policy, study.content_hash)
    changed = variant(study, path, value)
    assert changed.content_hash != study.content_hash
    assert not is_approved(policy, changed.content_hash)
    with pytest.raises(PolicyError, match="not approved"):
        ensure_allowed(changed, policy)


def test_approve_writes_the_hash_and_is_idempotent(tmp_path: Path, study: Study) -> None:
    path = write_policy(tmp_path)
    policy = approve(path, study, by="Dr A. Officer", note="IRB 2026-113", now=WHEN)
    (entry,) = load_policy(path).approved_studies
    assert entry.hash == study.content_hash
    assert (entry.name, entry.approved_by, entry.note) == (
        study.name,
        "Dr A. Officer",
        "IRB 2026-113",
    )
    assert entry.approved_at == WHEN
    assert policy == load_policy(path)
    written = path.read_bytes()
    again = approve(path, study, by="Someone Else", now=datetime(2027, 1, 1, tzinfo=UTC))
    assert again == policy
    assert path.read_bytes() == written


def test_approve_refuses_a_refused_study(tmp_path: Path, study: Study) -> None:
    path = write_policy(tmp_path, "pdpa")
    before = path.read_bytes()
    with pytest.raises(StudyRefusedError) as caught:
        approve(path, disclosed(study, min_cohort_size=10), by="Dr A. Officer")
    assert {f.rule_id for f in caught.value.findings} == {"PDPA-COHORT-1", "PDPA-TRANSFER-1"}
    assert "PDPA-COHORT-1" in str(caught.value)
    assert path.read_bytes() == before


def test_forced_approval_needs_a_reason_and_records_it(tmp_path: Path, study: Study) -> None:
    path = write_policy(tmp_path, "pdpa")
    with pytest.raises(PolicyError, match="needs a note"):
        approve(path, study, by="Dr A. Officer", force=True)
    policy = approve(
        path, study, by="Dr A. Officer", note="DTA signed, pending policy update", force=True
    )
    (entry,) = policy.approved_studies
    assert entry.overridden == ("PDPA-TRANSFER-1",)
    assert entry.note.startswith("forced despite PDPA-TRANSFER-1: DTA signed")
    # The agent's gate accepts the overridden rule, but not a rule tightened afterwards.
    assert ensure_allowed(study, policy, coordinator_url=COORDINATOR)
    stricter = policy.model_copy(update={"min_cohort_size": 50})
    with pytest.raises(StudyRefusedError, match="SITE-COHORT"):
        ensure_allowed(study, stricter)


def test_approve_needs_an_approver(tmp_path: Path, study: Study) -> None:
    with pytest.raises(PolicyError, match="approver"):
        approve(write_policy(tmp_path), study, by="  ")


# --- review ---------------------------------------------------------------------------------


def test_review_lists_columns_outflows_and_privacy(study: Study) -> None:
    mapping = site_mapping(PROFILES[1])
    policy = make_policy(site=mapping.site)
    review = review_study(study, policy, mapping, coordinator_url=COORDINATOR)
    assert review.study_hash == study.content_hash
    assert review.approvable
    assert not review.approved
    schema = study.feature_schema
    names = [c.name for c in review.columns]
    assert names == [f.name for f in schema.features] + ["ethnicity", schema.label.name]
    by_name = {c.name: c for c in review.columns}
    for name in ("age", "creatinine", "ethnicity"):
        assert by_name[name].local_column == mapping.column(name).column
    assert by_name[schema.label.name].local_column == mapping.label_column().column
    assert by_name["creatinine"].unit == "umol/L"
    assert by_name["creatinine"].range == (10, 2500)

    updates, metrics, counts = review.outflows
    assert metrics.artefact.value == "metrics"
    assert "one validation report per candidate release (4 in all)" in metrics.description
    assert "by sex_female, age_band, ethnicity" in metrics.description
    assert counts.artefact.value == "counts"
    assert updates.bytes_per_round == 4 * review.model.n_params
    assert updates.total_bytes == 4 * review.model.n_params * study.rounds.count
    assert COORDINATOR in updates.description
    assert "training records" in updates.description

    assert review.privacy.differentially_private
    assert "differentially private (DP-SGD" in review.privacy.statement
    assert review.notes == ()
    plain = review_study(study.replace(privacy={"dp": False}), policy, mapping)
    assert not plain.privacy.differentially_private
    assert "NOT differentially private" in plain.privacy.statement
    assert "no epsilon" in plain.privacy.statement


def test_review_counts_parameters_like_the_model_builder(study: Study) -> None:
    from fedcare.models.builders import build_model

    for model in ({"kind": "logistic_regression"}, {"kind": "mlp", "hidden": [16, 8]}):
        changed = study.replace(model=model)
        shape = changed.feature_schema.input_shape
        built = build_model(changed.model, shape)
        expected = sum(p.numel() for p in built.parameters())
        assert count_parameters(changed.model, shape) == expected
        assert review_study(changed, make_policy()).model.n_params == expected


def test_review_shows_declared_metrics_and_existing_approval(tmp_path: Path, study: Study) -> None:
    chatty = disclosed(study, artefacts=["model_updates", "metrics"])
    policy = approve(write_policy(tmp_path), chatty, by="Dr A. Officer", now=WHEN)
    review = review_study(chatty, policy, site_mapping(PROFILES[2]))
    assert review.approved
    assert [o.artefact.value for o in review.outflows] == ["model_updates", "metrics"]
    assert review.outflows[1].bytes_per_round is None
    assert any("mapping is for site" in note for note in review.notes)


# --- command line ---------------------------------------------------------------------------


def _study_file(tmp_path: Path, study: Study) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study.canonical()), encoding="utf-8")
    return path


def test_cli_review_exit_codes(tmp_path: Path, study: Study) -> None:
    study_file = _study_file(tmp_path, study)
    policy = write_policy(tmp_path)
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(yaml.safe_dump(site_mapping(PROFILES[0]).model_dump(mode="json")))
    ok = runner.invoke(
        app,
        [
            "site",
            "review",
            str(study_file),
            "--policy",
            str(policy),
            "--mapping",
            str(mapping),
            "--coordinator",
            COORDINATOR,
        ],
        env={"COLUMNS": "200"},
    )
    assert ok.exit_code == 0, ok.output
    assert "approvable" in ok.output
    assert "differentially private (DP-SGD" in ok.output
    assert study.content_hash in ok.output

    small_cells = _study_file(tmp_path / "small", disclosed(study, min_cohort_size=5))
    refused = runner.invoke(
        app,
        ["site", "review", str(small_cells), "--policy", str(policy)],
        env={"COLUMNS": "200"},
    )
    assert refused.exit_code == 1, refused.output
    assert "HIPAA-COHORT-1" in refused.output

    policy.write_text("site: x\njurisdiction: hipaa\nregion: US\nmin_cohort_size: 5\nbogus: 1\n")
    broken = runner.invoke(app, ["site", "review", str(study_file), "--policy", str(policy)])
    assert broken.exit_code == 2
    assert "bogus" in broken.output


def test_cli_approve_prints_the_hash_and_refuses(tmp_path: Path, study: Study) -> None:
    policy = write_policy(tmp_path)
    args = ["site", "approve", str(_study_file(tmp_path, study)), "--policy", str(policy)]
    done = runner.invoke(app, [*args, "--by", "Dr A. Officer", "--note", "IRB 2026-113"])
    assert done.exit_code == 0, done.output
    assert study.content_hash in done.output
    assert is_approved(load_policy(policy), study.content_hash)
    again = runner.invoke(app, [*args, "--by", "Dr A. Officer"])
    assert again.exit_code == 0
    assert "already approved" in again.output

    small_cells = disclosed(study, min_cohort_size=5)
    refused = runner.invoke(
        app,
        [
            "site",
            "approve",
            str(_study_file(tmp_path / "small", small_cells)),
            "--policy",
            str(policy),
            "--by",
            "A",
        ],
        env={"COLUMNS": "200"},
    )
    assert refused.exit_code == 1
    assert "HIPAA-COHORT-1" in refused.output
    assert not is_approved(load_policy(policy), small_cells.content_hash)


# --- documentation --------------------------------------------------------------------------

GOVERNANCE = Path(__file__).resolve().parents[1] / "docs" / "governance.md"


def test_governance_example_policy_validates() -> None:
    text = GOVERNANCE.read_text(encoding="utf-8")
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    policy = parse_policy(example, "docs/governance.md")
    assert policy.transfer_safeguard is not None
    assert len(policy.validation_gates) == 3


def test_governance_lists_every_rule() -> None:
    text = GOVERNANCE.read_text(encoding="utf-8")
    for jurisdiction in Jurisdiction:
        for rule in load_profile(jurisdiction).rules:
            assert f"`{rule.id}`" in text, rule.id


def test_review_shows_the_dp_plan_against_the_budget(tmp_path: Path, study: Study) -> None:
    """Issue 12, point 6: the officer sees sampling rate, steps, noise, epsilon per round
    and for the study, and how many rounds the budget affords, computed for this site."""
    from fedcare.privacy.dp.accountant import Mechanism, epsilon
    from fedcare.privacy.dp.plan import plan_site

    private = study.replace(privacy={"dp": True, "epsilon": 4.0, "delta": 1e-5})
    study_file = _study_file(tmp_path, private)
    policy = write_policy(tmp_path, privacy_budget={"admissions": {"epsilon": 2.0, "delta": 1e-5}})
    shown = runner.invoke(
        app,
        ["site", "review", str(study_file), "--policy", str(policy), "--rows", "2000"],
        env={"COLUMNS": "200"},
    )
    assert shown.exit_code == 0, shown.output
    plan = plan_site(private, 2000)
    assert f"sampling rate {plan.sampling_rate:.4g}" in shown.output
    assert f"noise multiplier {plan.noise_multiplier:.4g}" in shown.output
    assert f"whole study {plan.study_epsilon:.4g}" in shown.output
    # The budget (2.0) affords fewer rounds than the study's target (4.0) needs: how many?
    review = review_study(
        private,
        make_policy(privacy_budget={"admissions": {"epsilon": 2.0, "delta": 1e-5}}),
        n_train=2000,
    )
    assert review.privacy.plan is not None
    (fit,) = review.privacy.plan.budgets
    affordable = fit.rounds_affordable
    assert 0 < affordable < plan.rounds
    assert f"{affordable} of {plan.rounds}" in shown.output

    def spent(rounds: int) -> float:
        steps = Mechanism(plan.sampling_rate, plan.noise_multiplier, plan.steps_per_round * rounds)
        return epsilon([*plan.count, steps], 1e-5)

    assert spent(affordable) <= 2.0 < spent(affordable + 1)


def test_a_delta_too_large_for_the_site_is_refused_in_one_line(
    tmp_path: Path, study: Study
) -> None:
    """Issue 12, point 8: delta at or above 1/n of this site's rows, the study's or the
    budget's, is refused with one line, not a traceback."""
    private = study.replace(privacy={"dp": True, "epsilon": 4.0, "delta": 1e-3})
    study_file = _study_file(tmp_path, private)
    policy = write_policy(tmp_path)
    refused = runner.invoke(
        app,
        ["site", "review", str(study_file), "--policy", str(policy), "--rows", "1000"],
        env={"COLUMNS": "200"},
    )
    assert refused.exit_code == 1, refused.output
    assert "privacy.plan" in refused.output
    assert "not below 1 / 1000" in refused.output
    assert "Traceback" not in refused.output
    (tmp_path / "loose").mkdir()
    loose = write_policy(
        tmp_path / "loose", privacy_budget={"admissions": {"epsilon": 8.0, "delta": 1e-2}}
    )
    tight = study.replace(privacy={"dp": True, "epsilon": 4.0, "delta": 1e-6})
    refused = runner.invoke(
        app,
        ["site", "review", str(_study_file(tmp_path / "t", tight)), "--policy", str(loose)],
        env={"COLUMNS": "200"},
    )
    assert "--rows" in refused.output  # no row count: the plan is not guessed
    refused = runner.invoke(
        app,
        [
            "site",
            "review",
            str(_study_file(tmp_path / "t", tight)),
            "--policy",
            str(loose),
            "--rows",
            "500",
        ],
        env={"COLUMNS": "200"},
    )
    assert refused.exit_code == 1, refused.output
    assert "privacy.budget-delta" in refused.output


@pytest.mark.parametrize(
    "tail",
    [
        "",  # no approved_studies key at all
        "approved_studies: []  # none yet\n",
        "approved_studies:\n- hash: '" + "a" * 64 + "'\n  name: older\n  approved_by: Dr B\n"
        "  approved_at: 2026-01-01T00:00:00Z\n",
        "approved_studies:\n    - hash: '" + "b" * 64 + "'\n      name: older\n"
        "      approved_by: Dr B\n      approved_at: 2026-01-01T00:00:00Z\n\n# end of file\n",
    ],
)
def test_approve_keeps_the_officer_s_comments_and_style(
    tmp_path: Path, study: Study, tail: str
) -> None:
    # The reported problem: `site approve` rewrote policy.yaml in another YAML style,
    # dropping the officer's comments.
    head = (
        "# Policy of St Mary's, reviewed by the DPO on 2026-11-02.\n"
        "site: northgate   # our consortium name\n"
        "jurisdiction: hipaa\n"
        'region: "US"\n'
        "min_cohort_size: 11  # ethics committee minimum\n"
        f"coordinators: ['{COORDINATOR}']\n"
        "allowed_artefacts: [model_updates, metrics, counts]\n"
        "privacy_budget:\n  admissions: {epsilon: 8.0, delta: 1.0e-5}\n"
    )
    path = tmp_path / "policy.yaml"
    path.write_text(head + tail)
    before = load_policy(path)
    policy = approve(path, study, by="Dr A. Officer", note="IRB 2026-113", now=WHEN)
    text = path.read_text()
    assert text.startswith(head)
    assert "# ethics committee minimum" in text
    if "# end of file" in tail:
        assert text.rstrip().endswith("# end of file")
    assert load_policy(path) == policy
    assert policy.approved_studies[: len(before.approved_studies)] == before.approved_studies
    assert policy.approved_studies[-1].hash == study.content_hash
