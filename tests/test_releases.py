"""Candidate releases: site validation, gates from the study and the site, the registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.releases.card import export_release
from fedcare.releases.desk import NotYoursError, ReleaseDesk, ValidationRefusedError
from fedcare.releases.registry import RegistryError, ReleaseRegistry
from fedcare.schema.mapping import SiteMapping
from fedcare.simulation.rules import SiteRules
from fedcare.simulation.runner import SimulationOptions, run_simulation
from fedcare.site.dataset import SiteDataset, prepare_site_data
from fedcare.site.worker import SiteWorker
from fedcare.study import Study, parse_study
from fedcare.validation.gates import Verdict
from fedcare.validation.messages import ValidationReply, encode_validation_reply
from fedcare.validation.release import ReleaseState, decide
from fedcare.validation_spec import GateKind, GateSpec, Metric

from .conftest import toy_frame

STUDY = """
name: release-toy
schema:
  label: {name: y}
  features: [{name: a}, {name: b}]
  attributes: [{name: grp}]
training: {epochs: 1, batch_size: 16, learning_rate: 0.2}
rounds: {count: 4, min_sites: 2}
# Stratified: the hidden positives below are identical rows, which a keyed split keeps
# together on one side.
preprocessing: {split: stratified}
disclosure: {artefacts: [model_updates, metrics, counts], min_cohort_size: 8}
validation:
  threshold: 0.5
  subgroups: [grp]
  every: 2
  n_bootstrap: 30
  gates: [{kind: overall, metric: auroc, op: ">=", threshold: 0.6}]
seed: 3
"""

SITES = {"alpha": 600, "beta": 600, "gamma": 300}


def _frame(seed: int, n: int, hidden_positives: bool) -> pd.DataFrame:
    frame = toy_frame(seed, n)[["A", "B", "Y"]].copy()
    rng = np.random.default_rng(seed + 100)
    frame["G"] = rng.choice(["x", "y"], size=n)
    if hidden_positives:
        # Deteriorating patients of group y who look healthy: the model misses them.
        hidden = (frame["G"] == "y").to_numpy() & (rng.random(n) < 0.6)
        frame.loc[hidden, ["A", "B"]] = [-2.0, 2.0]
        frame.loc[hidden, "Y"] = 1
    return frame


def _mapping(site: str) -> SiteMapping:
    return SiteMapping(site=site, features={"a": "A", "b": "B"}, label="Y", attributes={"grp": "G"})


@pytest.fixture
def study() -> Study:
    return parse_study(STUDY)


@pytest.fixture
def sites(study: Study) -> list[SiteDataset]:
    return [
        prepare_site_data(_frame(i, n, hidden_positives=name == "beta"), _mapping(name), study)
        for i, (name, n) in enumerate(SITES.items())
    ]


SUBGROUP_SENSITIVITY = GateSpec(
    kind=GateKind.EVERY_SUBGROUP,
    metric=Metric.SENSITIVITY,
    op=">=",
    threshold=0.5,
    attribute="grp",
    min_positives=5,
)


def _simulate(
    study: Study, sites: list[SiteDataset], folder: Path, rules: dict[str, SiteRules]
) -> list[dict[str, object]]:
    result = run_simulation(
        study,
        sites,
        SimulationOptions(baselines=False, site_rules=rules, registry_dir=folder),
    )
    return [r.model_dump() for r in result.releases]


# --------------------------------------------------------------------------- #
# The decision rule
# --------------------------------------------------------------------------- #


def _verdict(site: str, passed: bool) -> Verdict:
    reasons = [] if passed else [f"site {site}: auroc 0.7 is below 0.8"]
    return Verdict(site=site, passed=passed, reasons=reasons, notes=[])


def test_every_site_must_pass_by_default() -> None:
    sites = ["a", "b", "c"]
    verdicts = {"a": _verdict("a", True), "b": _verdict("b", False), "c": _verdict("c", True)}
    decision = decide(sites, verdicts, quorum=None, deadline_passed=False)
    assert decision is not None
    assert decision.state is ReleaseState.REJECTED
    assert "2 of 3 site(s) passed, 3 needed" in decision.reason
    assert "site b: auroc 0.7 is below 0.8" in decision.reason


def test_a_quorum_promotes_despite_one_failure_and_says_so() -> None:
    sites = ["a", "b", "c"]
    verdicts = {"a": _verdict("a", True), "b": _verdict("b", False), "c": _verdict("c", True)}
    decision = decide(sites, verdicts, quorum=2, deadline_passed=False)
    assert decision is not None
    assert decision.state is ReleaseState.PROMOTED
    assert "failed: b" in decision.reason


def test_a_release_waits_for_verdicts_until_its_deadline() -> None:
    verdicts = {"a": _verdict("a", True)}
    assert decide(["a", "b"], verdicts, quorum=None, deadline_passed=False) is None
    late = decide(["a", "b"], verdicts, quorum=None, deadline_passed=True)
    assert late is not None
    assert late.state is ReleaseState.REJECTED
    assert "site b: no verdict by the validation deadline" in late.reason
    # A quorum the answering sites meet promotes at the deadline.
    enough = decide(["a", "b"], verdicts, quorum=1, deadline_passed=True)
    assert enough is not None
    assert enough.state is ReleaseState.PROMOTED


def test_a_quorum_larger_than_the_consortium_is_refused() -> None:
    with pytest.raises(ValueError, match="quorum of 4 site"):
        decide(["a", "b", "c"], {}, quorum=4, deadline_passed=True)


# --------------------------------------------------------------------------- #
# Releases in a simulated federation
# --------------------------------------------------------------------------- #


def test_subgroup_gate_failure_blocks_promotion_and_names_site_subgroup_threshold(
    study: Study, sites: list[SiteDataset], tmp_path: Path
) -> None:
    releases = _simulate(study, sites, tmp_path, {"beta": SiteRules((SUBGROUP_SENSITIVITY,), 8)})
    assert [(r["round"], r["state"]) for r in releases] == [(2, "rejected"), (4, "rejected")]
    for release in releases:
        verdicts = release["verdicts"]
        assert isinstance(verdicts, dict)
        assert verdicts["alpha"]["passed"]
        assert verdicts["gamma"]["passed"]
        assert not verdicts["beta"]["passed"]
        (reason,) = [r for r in verdicts["beta"]["reasons"] if "grp=" in r]
        assert reason.startswith("site beta: sensitivity ")
        assert reason.endswith(" in grp=y is below 0.5 (site policy)")
        assert reason in str(release["reason"])
    # Without beta's own gate that reason disappears: it came from the site's policy.
    plain = _simulate(study, sites, tmp_path / "plain", {})
    for release in plain:
        assert "grp=y" not in str(release["reason"])


def test_small_cells_are_suppressed_before_the_report_leaves_the_site(
    study: Study, sites: list[SiteDataset], tmp_path: Path
) -> None:
    registry = ReleaseRegistry.open(f"sqlite:///{tmp_path / 'r.db'}", tmp_path)
    desk = ReleaseDesk(study, [s.name for s in sites], registry)
    release = desk.open_candidate(1, np.zeros(3, dtype=np.float32), now=0.0)
    task = desk.task_for("gamma")
    assert task is not None
    gamma = sites[2]
    groups = gamma.test_frame["grp"].value_counts()
    # The site's own minimum cohort sits between its two groups' sizes.
    min_cohort = int(groups.min()) + 1
    assert min_cohort <= groups.max()
    reply = SiteWorker(study, gamma, 3, min_cohort=min_cohort).validate(task[1])
    cells = json.loads(reply)["report"]["subgroups"]["grp"]
    small = groups.idxmin()
    assert {"group": f"grp={small}", "suppressed": True} in cells
    (big,) = [c for c in cells if not c["suppressed"]]
    assert big["n"] == groups.max()
    recorded, _ = desk.receive("gamma", release.id, reply, now=0.0)
    assert recorded
    registry.close()


# --------------------------------------------------------------------------- #
# What the coordinator refuses
# --------------------------------------------------------------------------- #


@pytest.fixture
def desk_and_reply(
    study: Study, sites: list[SiteDataset], tmp_path: Path
) -> tuple[ReleaseDesk, int, ValidationReply]:
    registry = ReleaseRegistry.open(f"sqlite:///{tmp_path / 'r.db'}", tmp_path)
    desk = ReleaseDesk(study, [s.name for s in sites], registry)
    # All-zero weights score every patient 0.5: AUROC 0.5 fails the study's 0.6 gate.
    release = desk.open_candidate(1, np.zeros(3, dtype=np.float32), now=0.0)
    task = desk.task_for("alpha")
    assert task is not None
    reply = ValidationReply.model_validate_json(SiteWorker(study, sites[0], 3).validate(task[1]))
    assert not reply.verdict.passed
    return desk, release.id, reply


def test_a_site_cannot_pass_what_its_own_numbers_fail(desk_and_reply) -> None:
    desk, release, honest = desk_and_reply
    lying = honest.model_copy(
        update={"verdict": Verdict(site="alpha", passed=True, reasons=[], notes=[])}
    )
    _, stored = desk.receive("alpha", release, encode_validation_reply(lying), now=0.0)
    assert not stored.passed
    assert stored.reasons == ["site alpha: auroc 0.5 is below 0.6"]


def test_a_site_cannot_validate_as_another(desk_and_reply) -> None:
    desk, release, reply = desk_and_reply
    with pytest.raises(NotYoursError, match="claims to come from 'alpha'"):
        desk.receive("beta", release, encode_validation_reply(reply), now=0.0)


def test_an_unsuppressed_small_cell_is_refused(desk_and_reply) -> None:
    desk, release, reply = desk_and_reply
    data = json.loads(encode_validation_reply(reply))
    data["report"]["min_cohort"] = 8
    cell = next(c for c in data["report"]["subgroups"]["grp"] if not c["suppressed"])
    cell["n"] = 5
    cell["positives"] = 1
    with pytest.raises(ValidationRefusedError, match="describes 5 patients, below the minimum"):
        desk.receive("alpha", release, json.dumps(data).encode(), now=0.0)
    assert desk.registry.get(release).verdicts == []


@pytest.mark.parametrize("bad", ["NaN", "Infinity"])
def test_non_finite_numbers_in_a_report_are_refused(desk_and_reply, bad: str) -> None:
    desk, release, reply = desk_and_reply
    text = encode_validation_reply(reply).decode()
    data = json.loads(text)
    value = data["report"]["overall"]["brier"]["value"]
    tampered = text.replace(json.dumps(value), bad, 1)
    with pytest.raises(ValidationRefusedError, match="validation reply is invalid"):
        desk.receive("alpha", release, tampered.encode(), now=0.0)


def test_replays_are_idempotent_and_changes_are_refused(desk_and_reply) -> None:
    desk, release, reply = desk_and_reply
    body = encode_validation_reply(reply)
    assert desk.receive("alpha", release, body, now=0.0)[0]
    assert not desk.receive("alpha", release, body, now=0.0)[0]
    other = reply.verdict.model_copy(update={"notes": [*reply.verdict.notes, "second thoughts"]})
    changed = reply.model_copy(update={"verdict": other})
    with pytest.raises(ValidationRefusedError, match="already returned a different verdict"):
        desk.receive("alpha", release, encode_validation_reply(changed), now=0.0)
    with pytest.raises(ValidationRefusedError, match="sent to release 99"):
        desk.receive("alpha", 99, body, now=0.0)


def test_a_decided_release_takes_no_new_verdicts(desk_and_reply) -> None:
    desk, release, reply = desk_and_reply
    (settled,) = desk.settle(now=1e12)  # past the deadline with no verdicts
    assert settled.state is ReleaseState.REJECTED
    with pytest.raises(ValidationRefusedError, match="already rejected"):
        desk.receive("alpha", release, encode_validation_reply(reply), now=1e12)


# --------------------------------------------------------------------------- #
# The registry
# --------------------------------------------------------------------------- #


@pytest.fixture
def simulated(study: Study, sites: list[SiteDataset], tmp_path: Path) -> Path:
    _simulate(study, sites, tmp_path, {"beta": SiteRules((SUBGROUP_SENSITIVITY,), 8)})
    return tmp_path


def test_the_registry_survives_reopening(simulated: Path) -> None:
    url = f"sqlite:///{simulated / 'registry.db'}"
    first = ReleaseRegistry.open(url, simulated)
    before = first.releases()
    first.close()
    again = ReleaseRegistry.open(url, simulated)
    try:
        assert again.releases() == before
        assert len(before[1].verdicts) == 3
    finally:
        again.close()


def test_the_states_a_site_polls_are_the_releases_states(simulated: Path, study: Study) -> None:
    registry = ReleaseRegistry.open(f"sqlite:///{simulated / 'registry.db'}", simulated)
    try:
        last = registry.releases(study.content_hash)[-1]
        flipped = (
            ReleaseState.REJECTED if last.state is ReleaseState.PROMOTED else ReleaseState.PROMOTED
        )
        registry.override(last.id, flipped, "Dr Lead", "reviewed by hand")
        full = {r.id: r.state for r in registry.releases(study.content_hash)}
        assert registry.states(study.content_hash) == full
        assert full[last.id] is flipped
        assert registry.states("0" * 64) == {}
    finally:
        registry.close()


def test_a_tampered_model_file_is_detected(simulated: Path) -> None:
    registry = ReleaseRegistry.open(f"sqlite:///{simulated / 'registry.db'}", simulated)
    try:
        release = registry.releases()[0]
        (path,) = simulated.glob("release-*-r2.safetensors")
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
        with pytest.raises(RegistryError, match="does not match its recorded SHA-256"):
            registry.model(release)
    finally:
        registry.close()


def test_override_is_recorded_and_export_needs_a_promoted_release(
    simulated: Path, tmp_path: Path
) -> None:
    registry = ReleaseRegistry.open(f"sqlite:///{simulated / 'registry.db'}", simulated)
    try:
        release = registry.releases()[-1]
        with pytest.raises(RegistryError, match="only a promoted release leaves"):
            export_release(registry, release.id, tmp_path / "out")
        with pytest.raises(RegistryError, match="who decided it and why"):
            registry.override(release.id, ReleaseState.PROMOTED, "Dr Lead", " ")
        promoted = registry.override(
            release.id, ReleaseState.PROMOTED, "Dr Lead", "beta reviewed group y by hand"
        )
        assert promoted.override is not None
        assert promoted.override.by == "Dr Lead"
        assert promoted.reason.startswith("overridden by Dr Lead (was rejected)")
        files = export_release(registry, release.id, tmp_path / "out")
        card = json.loads((tmp_path / "out" / "model_card.json").read_text())
        assert {s["site"] for s in card["sites"]} == set(SITES)
        assert card["override_by"] == "Dr Lead"
        text = (tmp_path / "out" / "model_card.md").read_text()
        assert "Manual override" in text
        assert "No differential privacy is configured" in card["privacy"]
        assert "## Site beta: FAILED" in text
        # A small held-out set is flagged beside its numbers, and the suppression rule
        # names events as well as patients.
        assert "**Warning:**" not in text  # every site here has 20 or more positives
        assert "positives or negatives, are suppressed" in text
        from fedcare.releases.card import build_card, render_markdown

        built = build_card(registry.get(release.id), registry.study_of(release))
        first = built.sites[0]
        small = first.report.overall.model_copy(update={"positives": 12})
        section = first.model_copy(
            update={"report": first.report.model_copy(update={"overall": small})}
        )
        flagged = render_markdown(built.model_copy(update={"sites": [section]}))
        assert f"**Warning:** 12 positive(s) in {small.n} held-out patients" in flagged
        assert len(files) == 5
        assert (tmp_path / "out" / "release.json").exists()
    finally:
        registry.close()


def test_release_commands(simulated: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    db = str(simulated / "registry.db")
    listed = runner.invoke(app, ["release", "list", "--registry", db])
    assert listed.exit_code == 0, listed.output
    assert "rejected" in listed.output
    shown = runner.invoke(app, ["release", "show", "--registry", db, "2"])
    assert shown.exit_code == 0, shown.output
    assert "site beta: FAILED" in shown.output
    refused = runner.invoke(app, ["release", "export", "--registry", db, "2", "--out", "x"])
    assert refused.exit_code == 2
    assert "only a promoted release" in refused.output
    promoted = runner.invoke(
        app, ["release", "promote", "--registry", db, "2", "--by", "Ops", "--reason", "checked"]
    )
    assert promoted.exit_code == 0, promoted.output
    out = tmp_path / "export"
    done = runner.invoke(app, ["release", "export", "--registry", db, "2", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert (out / "model.safetensors").exists()
    missing = runner.invoke(app, ["release", "show", "--registry", db, "9"])
    assert missing.exit_code == 2
    assert "there is no release 9" in missing.output


def test_no_drop_compares_with_each_sites_report_on_the_parent_release(
    study: Study, tmp_path: Path
) -> None:
    sites = [
        prepare_site_data(_frame(i, n, hidden_positives=False), _mapping(name), study)
        for i, (name, n) in enumerate(SITES.items())
    ]
    validation = study.canonical()["validation"]
    validation["gates"].append({"kind": "no_drop", "metric": "auroc", "tolerance": 0.0})
    strict = study.replace(validation=validation)
    first, second = _simulate(strict, sites, tmp_path, {})
    assert first["state"] == "promoted"
    assert second["parent"] == first["id"]
    for site in SITES:
        first_notes = first["verdicts"][site]["notes"]
        assert f"site {site}: auroc drop not checked (no previous value to compare)" in first_notes
        # The second candidate was compared with the first, site by site.
        assert not any("drop not checked" in note for note in second["verdicts"][site]["notes"])
    registry = ReleaseRegistry.open(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path)
    try:
        old, new = registry.releases()
        for site in SITES:
            before = old.verdict_of(site).report.overall.auroc.value  # type: ignore[union-attr]
            after = new.verdict_of(site).report.overall.auroc.value  # type: ignore[union-attr]
            dropped = any("auroc worsened" in r for r in second["verdicts"][site]["reasons"])
            assert dropped == (after < before)
    finally:
        registry.close()


def test_the_model_card_states_the_studys_privacy_settings(study: Study) -> None:
    from fedcare.releases.card import privacy_statement

    study = study.replace(preprocessing={"scaling": "none", "split": "keyed"})
    private = study.replace(privacy={"dp": True, "epsilon": 2.0, "delta": 1e-4})
    text = privacy_statement(private)
    assert "DP-SGD" in text
    assert "epsilon = 2.0, delta = 0.0001" in text
    noisy = study.replace(privacy={"dp": True, "noise_multiplier": 1.5, "delta": 1e-4})
    assert "noise multiplier 1.5" in privacy_statement(noisy)


def test_the_desk_refuses_a_report_with_a_cell_of_one_positive() -> None:
    from fedcare.data import demo_study
    from fedcare.releases.desk import check_report
    from fedcare.validation.report import validate

    study = demo_study()
    rng = np.random.default_rng(0)
    y = np.zeros(80, dtype=np.int64)
    y[0] = 1
    attributes = pd.DataFrame(
        {name: ["x"] * 80 for name in study.validation.subgroups if name != "age_band"}
        | {"age": [50.0] * 80}
    )
    spec = study.validation
    report = validate(
        y,
        rng.random(80),
        attributes,
        spec.threshold,
        study.disclosure.min_cohort_size,
        spec.subgroups,
        10,
        0,
        min_events=1,
    )
    with pytest.raises(ValidationRefusedError, match="minimum events 1 is below"):
        check_report(report, study)
    forged = report.model_copy(update={"min_events": study.disclosure.min_cell_events})
    with pytest.raises(ValidationRefusedError, match="1 of 80 positive"):
        check_report(forged, study)


def test_async_studies_make_a_candidate_every_n_versions_validated_by_every_site(
    study: Study, sites: list[SiteDataset], tmp_path: Path
) -> None:
    asynchronous = study.replace(
        participation={"mode": "async", "buffer": 2, "max_staleness": 3},
        rounds={**study.rounds.model_dump(), "count": 6},
    )
    releases = _simulate(asynchronous, sites, tmp_path, {})
    # validation.every 2: versions 2, 4 and 6 are candidates; every site gave a verdict.
    assert [r["round"] for r in releases] == [2, 4, 6]
    assert all(sorted(r["verdicts"]) == sorted(SITES) for r in releases)
    assert all(r["state"] in ("promoted", "rejected") for r in releases)
