"""Drift detection: the tests and estimates, the built-in scenarios caught by the site's
monitor, what leaves a site, the coordinator's record and suspension, and drift during
training. Each privacy or integrity property is attacked: a site posting as another, a
summary for a release never promoted, a summary that may not leave."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from fedcare.audit import read_entries
from fedcare.cli import app
from fedcare.data import demo_study, template_text
from fedcare.data.drift import DriftScenario, later_admissions
from fedcare.drift.estimate import bbse_prevalence, expected_auroc
from fedcare.drift.summary import DriftSummary, SummaryRefusedError
from fedcare.drift.tests import benjamini_hochberg, permutation_ks, psi
from fedcare.federation.service import ConflictError, ForbiddenError
from fedcare.models.size import study_parameter_count
from fedcare.releases.registry import ReleaseRegistry
from fedcare.schema.mapping import SiteMapping
from fedcare.simulation.drift_demo import freeze_reference
from fedcare.simulation.inprocess import InProcessLink, run_in_process
from fedcare.simulation.runner import run_federation
from fedcare.simulation.sites import builtin_sites
from fedcare.site.dataset import prepare_site_data
from fedcare.site.monitor import monitor_table, summary_of
from fedcare.site.profiles import ProfileError, ProfileStore
from fedcare.site.worker import SiteWorker
from fedcare.study import Study, parse_study

from .conftest import LinkWrapper

# --- the statistics --------------------------------------------------------------


def test_benjamini_hochberg_matches_the_step_up_rule() -> None:
    p = [0.01, 0.04, 0.03, 0.005, 0.2]
    rejected, adjusted = benjamini_hochberg(p, 0.05)
    # Sorted: 0.005, 0.01, 0.03, 0.04, 0.2 against 0.01, 0.02, 0.03, 0.04, 0.05.
    assert rejected == [True, True, True, True, False]
    assert adjusted[3] == pytest.approx(0.025)
    assert adjusted[4] == pytest.approx(0.2)
    assert benjamini_hochberg([0.02, 0.03], 0.01)[0] == [False, False]


def test_permutation_ks_agrees_with_scipy_and_is_not_fooled_by_equal_samples() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 300), rng.normal(0.4, 1, 400)
    shifted = permutation_ks(a, b, 999, np.random.default_rng(1))
    assert shifted.statistic == pytest.approx(stats.ks_2samp(a, b).statistic)
    assert shifted.p_value == pytest.approx(1 / 1000)
    same = permutation_ks(a, rng.normal(0, 1, 400), 999, np.random.default_rng(1))
    assert same.p_value > 0.05


def test_psi_is_zero_for_equal_shares_and_grows_with_the_shift() -> None:
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert 0 < psi([0.5, 0.5], [0.6, 0.4]) < psi([0.5, 0.5], [0.8, 0.2])


def test_expected_auroc_with_known_outcomes_is_the_auroc() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500) + 0.3 * y, 2)  # ties on purpose
    assert expected_auroc(s, y.astype(np.float64)) == pytest.approx(roc_auc_score(y, s))


def test_bbse_recovers_a_label_shift() -> None:
    rng = np.random.default_rng(3)

    def draw(n: int, prevalence: float) -> tuple[np.ndarray, np.ndarray]:
        y = (rng.random(n) < prevalence).astype(np.int64)
        return y, 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 1.5 * y - 1)))

    y_ref, s_ref = draw(4000, 0.1)
    _, s_new = draw(4000, 0.3)
    estimate = bbse_prevalence(y_ref, s_ref, s_new, 0.4)
    assert estimate == pytest.approx(0.3, abs=0.03)


# --- the scenarios and the monitor ------------------------------------------------

HOSPITAL = "ashby-general"


@pytest.fixture(scope="module")
def frozen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Study, ProfileStore, SiteMapping]:
    base = demo_study()
    study = base.replace(rounds={**base.canonical()["rounds"], "count": 3})
    sites, _ = builtin_sites(study, 2026)
    # The three smaller hospitals are enough to train a model worth monitoring.
    sites = [s for s in sites if s.name not in ("northgate", "riverside")]
    run = run_federation(study, sites)
    data = next(s for s in sites if s.name == HOSPITAL)
    store = freeze_reference(
        study, data, run.params, len(run.rounds), tmp_path_factory.mktemp("state")
    )
    return study, store, later_admissions(HOSPITAL, 10, 0).mapping


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        (DriftScenario.ASSAY, ("creatinine", "ks")),
        (DriftScenario.RENAL_INFLUX, ("creatinine", "ks")),
        (DriftScenario.PREVALENCE, ("label", "prevalence")),
        (DriftScenario.MISSINGNESS, ("lactate", "missingness")),
    ],
)
def test_each_scenario_is_caught_and_named(frozen, scenario, expected) -> None:  # type: ignore[no-untyped-def]
    study, store, mapping = frozen
    frame = later_admissions(HOSPITAL, 1000, 11, scenario).frame
    result = monitor_table(study, mapping, None, store, frame, "0" * 64)
    assert result.checks.drift
    flagged = {(c.name, c.kind.value) for c in result.checks.checks if c.flagged}
    assert expected in flagged


def test_no_drift_raises_no_alarm_and_the_estimate_tracks_the_labels(frozen) -> None:  # type: ignore[no-untyped-def]
    study, store, mapping = frozen
    frame = later_admissions(HOSPITAL, 1000, 12).frame
    labelled = monitor_table(study, mapping, None, store, frame, "1" * 64)
    assert not labelled.checks.drift
    estimates = labelled.checks.estimates
    assert estimates.estimated_auroc is not None
    assert estimates.measured_auroc is not None
    assert abs(estimates.estimated_auroc - estimates.measured_auroc) < 0.06
    # Without the label column: the same estimate, no measured numbers, no label test.
    unlabelled = monitor_table(study, mapping, None, store, frame.drop(columns="outcome"), "1" * 64)
    assert unlabelled.checks.estimates.measured_auroc is None
    assert unlabelled.report is None
    assert "label" not in {c.name for c in unlabelled.checks.checks}
    assert unlabelled.checks.estimates.estimated_auroc == pytest.approx(estimates.estimated_auroc)


def test_a_value_the_mapping_does_not_list_is_refused_not_monitored(frozen) -> None:  # type: ignore[no-untyped-def]
    from fedcare.schema.mapping import DataValidationError

    study, store, mapping = frozen
    frame = later_admissions(HOSPITAL, 200, 13).frame
    frame["Sex"] = frame["Sex"].astype(object)
    frame.loc[3, "Sex"] = "unknown-code"
    with pytest.raises(DataValidationError, match="Sex"):
        monitor_table(study, mapping, None, store, frame, "2" * 64)


def test_the_summary_carries_no_values_and_is_refused_under_the_cohort(frozen) -> None:  # type: ignore[no-untyped-def]
    study, store, mapping = frozen
    frame = later_admissions(HOSPITAL, 400, 14, DriftScenario.ASSAY).frame
    result = monitor_table(study, mapping, None, store, frame, "3" * 64)
    summary = summary_of(result, study, None)
    dumped = summary.model_dump()
    # Flags, p-values, PSI and AUROC only: nothing per row or per level, no statistic
    # that a count could be recovered from, no prevalence.
    assert set(dumped) == {
        "study_hash",
        "site",
        "release",
        "monitored_at",
        "n",
        "labelled",
        "alpha",
        "drift",
        "checks",
        "estimated_auroc",
        "measured_auroc",
        "performance_passed",
        "reasons",
    }
    for check in dumped["checks"]:
        assert set(check) == {"name", "kind", "p_value", "p_adjusted", "flagged", "psi"}
    assert len(dumped["checks"]) == len(result.checks.checks)
    small = later_admissions(HOSPITAL, 5, 15).frame
    tiny = monitor_table(study, mapping, None, store, small, "4" * 64)
    with pytest.raises(SummaryRefusedError, match="minimum cohort"):
        summary_of(tiny, study, None)


def test_no_frozen_profile_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no release"):
        ProfileStore(tmp_path, "a" * 64).load()


def test_profiles_keep_no_row_order_and_rejected_candidates_are_dropped(
    frozen, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    study, store, _ = frozen
    profile, params = store.load()
    # Under DP (the demo study) the inputs are described by the held-out rows only.
    assert profile.inputs_from == "held_out"
    assert profile.input_rows == profile.n
    for name, feature in profile.features.items():
        if feature.kind == "numeric":
            assert feature.values == sorted(feature.values), name
    # A second candidate, then rejected: its files go.
    other = ProfileStore(tmp_path, study.content_hash)
    other.keep_candidate(profile.model_copy(update={"release": 2}), params)
    assert other.pending() == [2]
    assert not other.settle(2, "rejected")
    assert other.pending() == []
    assert list(other.folder.iterdir()) == []
    with pytest.raises(ProfileError, match="release 2 has no frozen profile"):
        store.load(2)


# --- through the service: profiles frozen, summaries kept, releases suspended ------

MONITORED = """
name: monitored-toy
schema:
  label: {name: y}
  features: [{name: a}, {name: b}]
  attributes: [{name: grp}]
training: {epochs: 1, batch_size: 16, learning_rate: 0.2}
rounds: {count: 4, min_sites: 2}
preprocessing: {split: stratified}
disclosure: {artefacts: [model_updates, metrics, counts, drift_summaries], min_cohort_size: 8}
validation:
  threshold: 0.5
  subgroups: [grp]
  every: 2
  quorum: 2
  n_bootstrap: 30
  gates: [{kind: overall, metric: auroc, op: ">=", threshold: 0.6}]
monitoring: {training: {min_cosine: 0.0, rounds: 2}}
seed: 3
"""


UNMONITORED = MONITORED.replace("monitoring: {training: {min_cosine: 0.0, rounds: 2}}\n", "")


def _frame(seed: int, n: int, flip: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0, 1, n), rng.normal(0, 1, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(2 * a - b)))).astype(int)
    return pd.DataFrame({"A": a, "B": b, "G": rng.choice(["x", "y"], n), "Y": 1 - y if flip else y})


def _mapping(site: str) -> SiteMapping:
    return SiteMapping(site=site, features={"a": "A", "b": "B"}, label="Y", attributes={"grp": "G"})


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp_path = tmp_path_factory.mktemp("monitored")
    study = parse_study(MONITORED)
    sizes = {"alpha": 600, "beta": 600, "gamma": 600}
    workers = {
        name: SiteWorker(
            study,
            prepare_site_data(_frame(i, n, flip=name == "gamma"), _mapping(name), study),
            study_parameter_count(study),
        )
        for i, (name, n) in enumerate(sizes.items())
    }
    registry = ReleaseRegistry.open(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path)
    service = run_in_process(study, workers, registry=registry, profiles_dir=tmp_path / "sites")
    return study, service, registry, tmp_path


def _summary(study: Study, site: str, release: int, passed: bool | None) -> bytes:
    return (
        DriftSummary(
            study_hash=study.content_hash,
            site=site,
            release=release,
            monitored_at=datetime.now(UTC),
            n=500,
            labelled=passed is not None,
            alpha=0.05,
            drift=True,
            checks=[],
            estimated_auroc=0.55,
            measured_auroc=0.52 if passed is not None else None,
            performance_passed=passed,
            reasons=[] if passed is not False else ["site alpha: auroc 0.520 is not >= 0.6"],
        )
        .model_dump_json()
        .encode()
    )


def test_sites_freeze_promoted_releases_and_a_failed_live_gate_suspends_at_that_site_only(
    monitored,
) -> None:  # type: ignore[no-untyped-def]
    study, service, registry, folder = monitored
    releases = registry.releases(study.content_hash)
    promoted = [r.id for r in releases if r.state.value == "promoted"]
    assert promoted
    for site in ("alpha", "beta"):
        store = ProfileStore(folder / "sites" / site, study.content_hash)
        assert store.frozen() == promoted
        assert store.pending() == []
        # Without DP every row of the site describes the inputs; scores stay held-out.
        profile, _ = store.load()
        data = prepare_site_data(_frame(("alpha", "beta").index(site), 600), _mapping(site), study)
        assert profile.inputs_from == "all_rows"
        assert profile.input_rows == data.n_train + data.n_test
        assert profile.n == data.n_test
    release = promoted[-1]
    failed = _summary(study, "alpha", release, False)
    assert service.receive_drift("alpha", failed)
    assert not service.receive_drift("alpha", failed)  # an exact retry is kept once
    kept = registry.get(release)
    assert [s.site for s in kept.suspended] == ["alpha"]
    assert "auroc 0.520" in kept.suspended[0].reason
    assert service.receive_drift("beta", _summary(study, "beta", release, True))
    assert [s.site for s in registry.get(release).suspended] == ["alpha"]
    assert [s.site for s in service.drift_summaries()] == ["alpha", "beta"]


def test_a_site_cannot_report_drift_as_another_or_for_a_release_never_promoted(
    monitored,
) -> None:  # type: ignore[no-untyped-def]
    study, service, registry, _ = monitored
    release = next(
        r.id for r in registry.releases(study.content_hash) if r.state.value == "promoted"
    )
    before = registry.get(release).suspended
    with pytest.raises(ForbiddenError):
        service.receive_drift("beta", _summary(study, "alpha", release, False))
    with pytest.raises(ConflictError, match="release 99"):
        service.receive_drift("alpha", _summary(study, "alpha", 99, False))
    with pytest.raises(ForbiddenError):
        service.receive_drift("mallory", _summary(study, "mallory", release, False))
    assert registry.get(release).suspended == before


def test_a_study_without_monitoring_takes_no_drift_reports(tmp_path: Path) -> None:
    study = parse_study(UNMONITORED)
    assert study.monitoring is None
    workers = {
        name: SiteWorker(study, prepare_site_data(_frame(i, 300), _mapping(name), study), 3)
        for i, name in enumerate(("alpha", "beta"))
    }
    registry = ReleaseRegistry.open(f"sqlite:///{tmp_path / 'r.db'}", tmp_path)
    service = run_in_process(study, workers, registry=registry)
    assert service.alignments() == {}
    # Nor does a site work out an alignment nobody reads (held-out scoring every round).
    from fedcare.federation.messages import Task, TaskHeader, encode_task

    alone = SiteWorker(study, workers["alpha"].data, 3)
    params = np.zeros(3, np.float32)
    for number in (1, 2, 3):
        header = TaskHeader(
            study_hash=study.content_hash, round=number, seed=number, nonce="c" * 32
        )
        _, update = alone.train(encode_task(Task(header, params)))
        params = params + update.delta
        assert alone.alignment is None, number
    with pytest.raises(ConflictError, match="no monitoring"):
        service.receive_drift("alpha", _summary(study, "alpha", 1, False))


def test_monitoring_must_be_disclosed() -> None:
    from fedcare.study import StudyError

    with pytest.raises((StudyError, ValueError), match="drift_summaries"):
        parse_study(MONITORED.replace(", drift_summaries", ""))


def test_a_site_whose_data_pull_away_is_flagged_during_training(monitored) -> None:  # type: ignore[no-untyped-def]
    study, service, _, _ = monitored
    alignments = service.alignments()
    assert set(alignments) == {"alpha", "beta", "gamma"}
    # Each site reports every aggregated round but the last (it learns the step next round).
    assert [a.round for a in alignments["alpha"]] == list(range(1, study.rounds.count))
    assert all(a.cosine > 0 for a in alignments["alpha"])
    assert all(a.cosine < 0 for a in alignments["gamma"])  # its labels are flipped
    assert all(a.loss is not None for a in alignments["gamma"])
    assert set(service.drifting()) == {"gamma"}
    # The operator's status (from the state alone) shows it; another site does not see it.
    from fedcare.federation.status import overview

    assert set(overview(service.state, study.content_hash).drifting) == {"gamma"}
    assert set(service.status().drifting) == {"gamma"}
    assert service.status("alpha").drifting == {}
    assert set(service.status("gamma").drifting) == {"gamma"}
    body = alignments["alpha"][0].model_copy(update={"round": 50}).model_dump_json()
    with pytest.raises(ConflictError, match="not been aggregated"):
        service.receive_alignment("alpha", body.encode())


def test_site_monitor_command_writes_json_html_audit_and_exits_1_on_drift(
    frozen, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    import yaml

    study, store, mapping = frozen
    state = store.folder.parent.parent
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study.canonical(), sort_keys=False))
    (tmp_path / "mapping.yaml").write_text(yaml.safe_dump(mapping.model_dump(mode="json")))
    later_admissions(HOSPITAL, 600, 21, DriftScenario.ASSAY).frame.to_csv(
        tmp_path / "new.csv", index=False
    )
    (tmp_path / "policy.yaml").write_text(template_text("policy"))
    config = tmp_path / "site.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "site": HOSPITAL,
                "coordinator": "https://127.0.0.1:9/",
                "tls": {"cert": "x.crt", "key": "x.key", "ca": "ca.crt"},
                "study": "study.yaml",
                "mapping": "mapping.yaml",
                "state_dir": str(state),
                "policy": "policy.yaml",
            }
        )
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "site",
            "monitor",
            "--config",
            str(config),
            "--data",
            str(tmp_path / "new.csv"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 1, result.output
    assert "verdict: DRIFT" in result.output
    assert "declares no monitoring" in result.output
    written = json.loads(next(out.glob("*.json")).read_text())
    assert written["checks"]["drift"] is True
    flagged = {c["name"] for c in written["checks"]["checks"] if c["flagged"]}
    assert "creatinine" in flagged
    entries = [e for e in read_entries(tmp_path / "audit.jsonl") if e.event == "drift.monitored"]
    assert len(entries) == 1
    assert entries[0].details["drift"] is True
    assert "creatinine:ks" in entries[0].details["flagged"]
    assert "<table>" in next(out.glob("*.html")).read_text()
    missing = CliRunner().invoke(
        app, ["site", "monitor", "--config", str(config), "--data", str(tmp_path / "nope.csv")]
    )
    assert missing.exit_code == 2
    assert "Traceback" not in missing.output


def test_site_review_lists_the_drift_outflows(tmp_path: Path) -> None:
    from fedcare.policy import load_policy, review_study

    path = tmp_path / "policy.yaml"
    path.write_text(template_text("policy"))
    policy = load_policy(path)
    review = review_study(parse_study(MONITORED), policy, None)
    drift = [o for o in review.outflows if o.artefact.value == "drift_summaries"]
    assert len(drift) == 1
    assert "cosine" in drift[0].description
    assert "p-value" in drift[0].description
    plain = review_study(parse_study(UNMONITORED), policy, None)
    assert all(o.artefact.value != "drift_summaries" for o in plain.outflows)


def test_a_summary_for_a_rejected_release_suspends_nothing(tmp_path: Path) -> None:
    study = parse_study(MONITORED)  # quorum 2: with one of two sites failing, rejected
    workers = {
        name: SiteWorker(
            study,
            prepare_site_data(_frame(i, 400, flip=name == "beta"), _mapping(name), study),
            study_parameter_count(study),
        )
        for i, name in enumerate(("alpha", "beta"))
    }
    registry = ReleaseRegistry.open(f"sqlite:///{tmp_path / 'r.db'}", tmp_path)
    service = run_in_process(study, workers, registry=registry)
    rejected = [r.id for r in registry.releases(study.content_hash)]
    assert rejected
    assert all(registry.get(r).state.value == "rejected" for r in rejected)
    with pytest.raises(ConflictError, match="not a promoted release"):
        service.receive_drift("alpha", _summary(study, "alpha", rejected[-1], False))
    assert registry.get(rejected[-1]).suspended == []
    assert service.drift_summaries() == []


def test_the_simulation_round_history_and_warnings_name_the_drifting_site(tmp_path: Path) -> None:
    from fedcare.simulation.runner import SimulationOptions, run_simulation

    study = parse_study(MONITORED)
    sites = [
        prepare_site_data(_frame(i, 600, flip=name == "gamma"), _mapping(name), study)
        for i, name in enumerate(("alpha", "beta", "gamma"))
    ]
    result = run_simulation(study, sites, SimulationOptions(baselines=False, registry_dir=tmp_path))
    first, last = result.rounds[0], result.rounds[-1]
    assert set(first.alignment) == {"alpha", "beta", "gamma"}
    assert first.alignment["gamma"] < 0 < first.alignment["alpha"]
    assert first.drifting == []
    assert last.drifting == ["gamma"]
    assert any(w.startswith("gamma pulls away") for w in result.warnings)


def test_alignment_is_reported_under_secure_aggregation_and_dp_withholds_the_loss(
    tmp_path: Path,
) -> None:
    secure = parse_study(
        UNMONITORED.replace(
            "seed: 3",
            "secure_aggregation: {enabled: true, clip_norm: 5.0}\n"
            "monitoring: {training: {min_cosine: 0.0, rounds: 2}}\nseed: 3",
        )
    )
    workers = {
        name: SiteWorker(
            secure,
            prepare_site_data(_frame(i, 400, flip=name == "gamma"), _mapping(name), secure),
            study_parameter_count(secure),
        )
        for i, name in enumerate(("alpha", "beta", "gamma"))
    }
    registry = ReleaseRegistry.open(f"sqlite:///{tmp_path / 'r.db'}", tmp_path)
    service = run_in_process(secure, workers, registry=registry)
    alignments = service.alignments()
    assert {s: [a.round for a in rows] for s, rows in alignments.items()} == {
        s: [1, 2, 3] for s in ("alpha", "beta", "gamma")
    }
    assert all(a.cosine < 0 for a in alignments["gamma"])
    assert set(service.drifting()) == {"gamma"}
    # Under DP the loss on the site's rows is not what DP-SGD released: it stays.
    from fedcare.federation.messages import Task, TaskHeader, encode_task

    dp = secure.replace(
        privacy={"dp": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5},
        preprocessing={**secure.canonical()["preprocessing"], "scaling": "none", "split": "keyed"},
    )
    data = prepare_site_data(_frame(0, 400), _mapping("alpha"), dp)
    private = SiteWorker(dp, data, study_parameter_count(dp))
    params = np.zeros(study_parameter_count(dp), np.float32)
    for number in (1, 2):
        header = TaskHeader(study_hash=dp.content_hash, round=number, seed=number, nonce="a" * 32)
        _, update = private.train(encode_task(Task(header, params)))
        params = params + 0.5 * update.delta
    assert private.alignment is not None
    assert private.alignment.round == 1
    assert private.alignment.cosine == pytest.approx(1.0, abs=1e-6)
    assert private.alignment.loss is None
    # Without DP the loss is sent, but not from fewer held-out rows than the cohort rule.
    for cohort, sent in ((8, True), (10_000, False)):
        plain = secure.replace(
            disclosure={**secure.canonical()["disclosure"], "min_cohort_size": cohort}
        )
        worker = SiteWorker(plain, workers["alpha"].data, study_parameter_count(plain))
        params = np.zeros(study_parameter_count(plain), np.float32)
        for number in (1, 2):
            header = TaskHeader(
                study_hash=plain.content_hash, round=number, seed=number, nonce="b" * 32
            )
            _, update = worker.train(encode_task(Task(header, params)))
            params = params + update.delta
        assert worker.alignment is not None
        assert (worker.alignment.loss is not None) is sent, cohort


def test_demo_drift_shows_the_monitor_catching_the_scenarios(tmp_path: Path) -> None:
    done = CliRunner().invoke(
        app,
        ["demo", "--drift", "--rounds", "1", "--scale", "0.3", "--out", str(tmp_path)],
        terminal_width=200,
    )
    assert done.exit_code == 0, done.output
    rows = {line.split("│")[1].strip(): line for line in done.output.splitlines() if "│" in line}
    assert set(DriftScenario) <= set(rows)
    assert "stable" in rows["none"]
    assert "drift" in rows["assay"]
    assert "creatinine (ks)" in rows["assay"]
    assert len(list((tmp_path / "drift").glob("*/monitor-*.html"))) == len(DriftScenario)
    tiny = CliRunner().invoke(app, ["demo", "--drift", "--scale", "0.1", "--out", str(tmp_path)])
    assert tiny.exit_code == 2
    assert "needs at least two rows of each class" in tiny.output
    assert "Traceback" not in tiny.output


class _NeverDecides(LinkWrapper):
    """A coordinator link that reports every release as still a candidate, for ever."""

    def release_states(self, study_hash: str) -> dict[int, str]:
        return dict.fromkeys(self.inner.release_states(study_hash), "candidate")


def test_a_coordinator_that_never_decides_cannot_keep_a_finished_site_waiting(
    tmp_path: Path,
) -> None:
    import time

    from fedcare.site.participant import Participant, Step

    study = parse_study(MONITORED.replace("  quorum: 2\n", "  quorum: 2\n  deadline_s: 0.2\n"))
    workers = {
        name: SiteWorker(
            study,
            prepare_site_data(_frame(i, 400), _mapping(name), study),
            study_parameter_count(study),
        )
        for i, name in enumerate(("alpha", "beta"))
    }
    registry = ReleaseRegistry.open(f"sqlite:///{tmp_path / 'r.db'}", tmp_path)
    service = run_in_process(study, workers, registry=registry, profiles_dir=tmp_path / "sites")
    store = ProfileStore(tmp_path / "sites" / "alpha", study.content_hash)
    release = store.frozen()[-1]
    for suffix in (".json", ".params"):  # as if alpha had not yet learnt the outcome
        (store.folder / f"release-{release}{suffix}").rename(
            store.folder / f"pending-{release}{suffix}"
        )
    participant = Participant(
        workers["alpha"], _NeverDecides(InProcessLink(service, "alpha")), profiles=store
    )
    started = time.monotonic()
    steps = []
    while (step := participant.step()) is not Step.FINISHED:
        steps.append(step)
        assert time.monotonic() - started < 10, "the site waited for ever"
        time.sleep(0.05)
    assert Step.HOLD in steps  # it did wait, then gave up
    assert store.pending() == [release]
