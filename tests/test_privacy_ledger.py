"""The site's privacy ledger: durable, composed across studies, refuses overruns before
anything is computed or sent, survives kill -9 and never under-counts."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedcare.federation.messages import Task, TaskHeader, encode_task
from fedcare.models.builders import initial_parameters
from fedcare.privacy.dp.accountant import Mechanism, epsilon
from fedcare.privacy.dp.guard import PrivacyGuard
from fedcare.privacy.dp.ledger import Budget, BudgetExceededError, PrivacyLedger, Release
from fedcare.privacy.dp.plan import plan_site
from fedcare.simulation.runner import run_federation
from fedcare.site.dataset import SiteDataset
from fedcare.site.worker import SiteWorker
from fedcare.study import AccountantKind, Study

ROUND = Mechanism(0.1, 1.2, 10)
STUDY_A = "a" * 64
STUDY_B = "b" * 64


def _release(study: str, rnd: int, task: str = "t", rows: str = "r") -> Release:
    return Release(study, f"study-{study[0]}", rnd, task * 64, rows * 64, "{}")


def _reserve(ledger: PrivacyLedger, budget: Budget, study: str, rnd: int, task: str = "t"):  # type: ignore[no-untyped-def]
    return ledger.reserve("icu", budget, _release(study, rnd, task), ROUND)


def test_spend_composes_every_round_of_every_study(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    budget = Budget(epsilon=50.0, delta=1e-5)
    for rnd in (1, 2, 3):
        _reserve(ledger, budget, STUDY_A, rnd)
    last = _reserve(ledger, budget, STUDY_B, 1)
    expected = epsilon([ROUND] * 4, 1e-5)
    assert last.spent == pytest.approx(expected)
    assert ledger.spent("icu", budget) == pytest.approx(expected)
    per_study = {s.study_hash: s for s in ledger.by_study("icu", budget)}
    assert per_study[STUDY_A].rounds == 3
    assert per_study[STUDY_A].epsilon == pytest.approx(epsilon([ROUND] * 3, 1e-5))
    assert per_study[STUDY_B].steps == 10
    ledger.close()
    # Durable: a new process (here a new engine) sees every spend.
    again = PrivacyLedger(tmp_path / "ledger.sqlite")
    assert again.mechanisms("icu") == [ROUND] * 4
    assert again.spent("other", budget) == 0.0


def test_overrun_is_refused_with_the_numbers_and_nothing_is_recorded(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    one = epsilon([ROUND], 1e-5)
    two = epsilon([ROUND] * 2, 1e-5)
    budget = Budget(epsilon=(one + two) / 2, delta=1e-5)  # room for one round, not two
    _reserve(ledger, budget, STUDY_A, 1)
    with pytest.raises(BudgetExceededError) as refused:
        _reserve(ledger, budget, STUDY_A, 2)
    message = str(refused.value)
    assert "'icu'" in message
    assert f"{one:.4g}" in message
    assert f"{two:.4g}" in message
    assert "not sent" in message
    assert ledger.mechanisms("icu") == [ROUND]
    # Another study cannot use the same data set's budget either.
    with pytest.raises(BudgetExceededError):
        _reserve(ledger, budget, STUDY_B, 1)


def test_same_task_again_is_not_charged_twice_but_a_new_task_is(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    budget = Budget(epsilon=50.0, delta=1e-5)
    first = _reserve(ledger, budget, STUDY_A, 1, task="t")
    again = _reserve(ledger, budget, STUDY_A, 1, task="t")
    assert again.repeated
    assert again.secret_seed == first.secret_seed  # retraining yields the same update
    other = _reserve(ledger, budget, STUDY_A, 1, task="u")  # a different model for round 1
    assert not other.repeated
    assert other.secret_seed != first.secret_seed
    assert len(ledger.mechanisms("icu")) == 2
    with pytest.raises(BudgetExceededError, match="other DP settings"):
        ledger.reserve("icu", budget, _release(STUDY_A, 1), Mechanism(0.1, 2.0, 10))


def test_same_task_over_changed_rows_is_a_new_release_with_fresh_noise(tmp_path: Path) -> None:
    """Issue 12, point 4: a restarted agent reloads a corrected table (same row count) and
    retrains the same task. Reusing the seed would put the same noise on different data,
    and their difference would remove it; the ledger charges it anew instead."""
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    budget = Budget(epsilon=50.0, delta=1e-5)
    first = ledger.reserve("icu", budget, _release(STUDY_A, 1, rows="r"), ROUND)
    changed = ledger.reserve("icu", budget, _release(STUDY_A, 1, rows="s"), ROUND)
    assert not changed.repeated
    assert changed.secret_seed != first.secret_seed
    assert changed.spent == pytest.approx(epsilon([ROUND] * 2, 1e-5))
    ledger.close()
    # Durable across a restart, and the original rows still map to their own seed.
    again = PrivacyLedger(tmp_path / "ledger.sqlite")
    back = again.reserve("icu", budget, _release(STUDY_A, 1, rows="r"), ROUND)
    assert back.repeated
    assert back.secret_seed == first.secret_seed


def test_ledger_database_is_full_sync_wal(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    _reserve(ledger, Budget(50.0, 1e-5), STUDY_A, 1)
    with ledger._engine.connect() as connection:
        sync = connection.exec_driver_sql("PRAGMA synchronous").scalar()
        mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
    assert (sync, mode) == (2, "wal")  # 2 = FULL
    # It holds the secret seeds of the noise: the site's account only.
    assert (tmp_path / "ledger.sqlite").stat().st_mode & 0o777 == 0o600


# --- the guard and the site worker ------------------------------------------------


def _dp_study(study: Study, eps: float = 3.0) -> Study:
    return study.replace(privacy={"dp": True, "epsilon": eps, "delta": 1e-4})


def _task(study: Study, rnd: int) -> bytes:
    params = initial_parameters(study.model, study.feature_schema.input_shape, study.seed)
    header = TaskHeader(study_hash=study.content_hash, round=rnd, seed=rnd, nonce=f"{rnd:032x}")
    return encode_task(Task(header=header, params=params))


def test_worker_refuses_before_training_and_sends_nothing(
    tmp_path: Path, toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    study = _dp_study(toy_study)
    site = toy_sites[0]
    plan = plan_site(study, site.n_train)
    one = epsilon([*plan.count, plan.round_mechanism], 1e-4)
    two = epsilon([*plan.count, plan.round_mechanism, plan.round_mechanism], 1e-4)
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    guard = PrivacyGuard(ledger, "icu", Budget((one + two) / 2, 1e-4))
    n_params = initial_parameters(study.model, study.feature_schema.input_shape, 0).shape[0]
    worker = SiteWorker(study, site, n_params, privacy=guard)
    assert worker.handle(_task(study, 1))
    with pytest.raises(BudgetExceededError, match="would be exceeded"):
        worker.handle(_task(study, 2))  # nothing leaves
    assert ledger.mechanisms("icu") == [*plan.count, plan.round_mechanism]


@pytest.mark.parametrize(
    ("dp", "budget", "message"),
    [
        (False, Budget(1.0, 1e-5), "not differentially private"),
        (True, None, "sets no privacy_budget"),
    ],
)
def test_guard_has_no_default_budget_and_refuses_unbounded_studies(
    tmp_path: Path,
    toy_study: Study,
    toy_sites: list[SiteDataset],
    dp: bool,
    budget: Budget | None,
    message: str,
) -> None:
    study = _dp_study(toy_study) if dp else toy_study
    guard = PrivacyGuard(PrivacyLedger(tmp_path / "l.sqlite"), "icu", budget)
    with pytest.raises(BudgetExceededError, match=message):
        guard.admit(study, toy_sites[0].n_train, 1, b"task", "f" * 64, "{}")
    assert guard.ledger.mechanisms("icu") == []


def test_non_dp_study_without_a_budget_runs_as_before(
    tmp_path: Path, toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    guard = PrivacyGuard(PrivacyLedger(tmp_path / "l.sqlite"), "icu", None)
    assert guard.admit(toy_study, toy_sites[0].n_train, 1, b"task", "f" * 64, "{}") is None


@pytest.mark.slow
def test_study_goes_on_without_a_site_whose_budget_is_spent(
    tmp_path: Path, toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    study = _dp_study(toy_study, eps=4.0).replace(rounds={"count": 4, "min_sites": 2})
    n_params = initial_parameters(study.model, study.feature_schema.input_shape, 0).shape[0]
    small = toy_sites[2]
    plan = plan_site(study, small.n_train)
    two_rounds = epsilon([*plan.count, *[plan.round_mechanism] * 2], 1e-4, AccountantKind.RDP)
    workers = {}
    for site in toy_sites:
        budget = Budget(two_rounds * 1.01 if site is small else 100.0, 1e-4)
        guard = PrivacyGuard(PrivacyLedger(tmp_path / f"{site.name}.sqlite"), "icu", budget)
        workers[site.name] = SiteWorker(study, site, n_params, privacy=guard)
    records = run_federation(study, toy_sites, workers=workers).rounds
    assert [r.status for r in records] == ["closed"] * 4
    assert [small.name in r.participants for r in records] == [True, True, False, False]
    assert all(len(r.participants) >= 2 for r in records)
    assert len(workers[small.name].privacy.ledger.mechanisms("icu")) == 3  # type: ignore[union-attr]


def test_the_spend_is_on_disk_before_training_starts(
    tmp_path: Path,
    toy_study: Study,
    toy_sites: list[SiteDataset],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fails if the reservation moves after training: when the mechanism first touches the
    rows, another connection must already read this round's spend from the file."""
    import fedcare.site.worker as worker_module

    study = _dp_study(toy_study)
    site = toy_sites[0]
    path = tmp_path / "ledger.sqlite"
    guard = PrivacyGuard(PrivacyLedger(path), "icu", Budget(100.0, 1e-4))
    n_params = initial_parameters(study.model, study.feature_schema.input_shape, 0).shape[0]
    worker = SiteWorker(study, site, n_params, privacy=guard)
    real = worker_module.train_local
    seen: list[int] = []

    def train_after_checking(*args, **kwargs):  # type: ignore[no-untyped-def]
        with sqlite3.connect(path) as db:
            seen.append(db.execute("SELECT COUNT(*) FROM spends WHERE round = 3").fetchone()[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(worker_module, "train_local", train_after_checking)
    worker.handle(_task(study, 3))
    assert seen == [1]


def test_the_worker_keys_the_release_on_the_exact_rows(
    tmp_path: Path, toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    """A corrected value, same row count, same task: a new release with a fresh seed."""
    import dataclasses

    study = _dp_study(toy_study)
    site = toy_sites[0]
    guard = PrivacyGuard(PrivacyLedger(tmp_path / "l.sqlite"), "icu", Budget(100.0, 1e-4))
    n_params = initial_parameters(study.model, study.feature_schema.input_shape, 0).shape[0]
    corrected = site.x_train.copy()
    corrected[0, 0] += 0.5
    fixed = dataclasses.replace(site, x_train=corrected)
    assert fixed.n_train == site.n_train
    assert fixed.fingerprint != site.fingerprint
    task = _task(study, 1)
    before = SiteWorker(study, site, n_params, privacy=guard).handle(task)
    again = SiteWorker(study, site, n_params, privacy=guard).handle(task)
    assert again == before  # same rows, same task: the same release, charged once
    SiteWorker(study, fixed, n_params, privacy=guard).handle(task)
    plan = plan_site(study, site.n_train)
    # Each fingerprint: its own noisy count and its own round.
    assert guard.ledger.mechanisms("icu") == [*plan.count, plan.round_mechanism] * 2


# --- kill -9 in the middle of a run -------------------------------------------------

_CHILD = r"""
import os, sys
from pathlib import Path
from tests.conftest import TOY_STUDY, toy_frame, toy_mapping
from fedcare.federation.messages import Task, TaskHeader, encode_task
from fedcare.models.builders import initial_parameters
from fedcare.privacy.dp.guard import PrivacyGuard
from fedcare.privacy.dp.ledger import Budget, PrivacyLedger
from fedcare.site.dataset import prepare_site_data
from fedcare.site.worker import SiteWorker
from fedcare.study import parse_study

folder = Path(sys.argv[1])
study = parse_study(TOY_STUDY).replace(
    privacy={"dp": True, "noise_multiplier": 5.0, "delta": 1e-4}, rounds={"count": 10000}
)
data = prepare_site_data(toy_frame(0, 300), toy_mapping("alpha"), study)
params = initial_parameters(study.model, study.feature_schema.input_shape, study.seed)
guard = PrivacyGuard(PrivacyLedger(folder / "ledger.sqlite"), "icu", Budget(1e6, 1e-4))
worker = SiteWorker(study, data, params.shape[0], privacy=guard)
sent = open(folder / "sent.txt", "a")
for rnd in range(1, 10000):
    header = TaskHeader(study_hash=study.content_hash, round=rnd, seed=rnd, nonce=f"{rnd:032x}")
    task = encode_task(Task(header, params))
    worker.handle(task)
    # "Send": the update leaves only after handle() returned, i.e. after the ledger commit.
    sent.write(f"{rnd}\n"); sent.flush(); os.fsync(sent.fileno())
"""


@pytest.mark.slow
def test_ledger_survives_kill_9_and_never_under_counts(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        cwd=repo,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    sent_file = tmp_path / "sent.txt"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if sent_file.exists() and len(sent_file.read_text().split()) >= 15:
                break
            if child.poll() is not None:
                pytest.fail(f"child exited early: {child.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            time.sleep(0.02)
        else:
            pytest.fail("child made no progress")
        os.kill(child.pid, signal.SIGKILL)  # mid-run: between, or inside, rounds
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    sent = [int(line) for line in sent_file.read_text().split()]
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        recorded = {r for (r,) in db.execute("SELECT round FROM spends")}
    # Every update that left was recorded first; at most the round in flight is extra.
    # Round 0 is the data set's one count release, recorded before its first round.
    assert 0 in recorded
    assert set(sent) <= recorded
    assert len(recorded - {0}) - len(sent) in (0, 1)
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    assert len(ledger.mechanisms("icu")) == len(recorded)


def test_site_budget_command_shows_spent_and_remaining(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedcare.cli import app

    (tmp_path / "policy.yaml").write_text(
        "site: northgate\njurisdiction: hipaa\nregion: US\nmin_cohort_size: 11\n"
        "privacy_budget:\n  icu: {epsilon: 8.0, delta: 1.0e-5}\n"
        "  wards: {epsilon: 2.0, delta: 1.0e-6, accountant: pld}\n"
    )
    (tmp_path / "site.yaml").write_text(
        "site: northgate\ncoordinator: https://coord.example:8443\n"
        "tls: {cert: a.crt, key: a.key, ca: ca.crt}\npolicy: policy.yaml\nstate_dir: state\n"
    )
    runner = CliRunner()
    before = runner.invoke(app, ["site", "budget", "--config", str(tmp_path / "site.yaml")])
    assert before.exit_code == 0, before.output
    # No ledger yet: both budgets are shown, whole.
    assert "pld" in before.output
    assert "wards" in before.output
    assert not (tmp_path / "state" / "privacy-ledger.sqlite").exists()  # reading creates nothing

    ledger = PrivacyLedger(tmp_path / "state" / "privacy-ledger.sqlite")
    budget = Budget(8.0, 1e-5)
    for rnd in (1, 2):
        _reserve(ledger, budget, STUDY_A, rnd)
    ledger.close()
    spent = epsilon([ROUND] * 2, 1e-5)
    after = runner.invoke(
        app, ["site", "budget", "--config", str(tmp_path / "site.yaml")], env={"COLUMNS": "200"}
    )
    assert after.exit_code == 0, after.output
    icu = next(line for line in after.output.splitlines() if "icu" in line and "rdp" in line)
    assert f"{spent:.4f}" in icu
    assert f"{8.0 - spent:.4f}" in icu
    assert "study-a" in after.output
    assert STUDY_A[:12] in after.output


def test_a_masked_send_is_recorded_once_and_survives_a_restart(tmp_path: Path) -> None:
    """One secure session per task, also after the agent restarts: the second claim for a
    task fails, from a new process's ledger too."""
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    assert not ledger.masked_sent(STUDY_A, "t" * 64)
    assert ledger.record_masked(STUDY_A, "t" * 64, "s" * 64)
    assert not ledger.record_masked(STUDY_A, "t" * 64, "u" * 64)
    ledger.close()
    again = PrivacyLedger(tmp_path / "ledger.sqlite")
    assert again.masked_sent(STUDY_A, "t" * 64)
    assert not again.record_masked(STUDY_A, "t" * 64, "s" * 64)
    assert again.record_masked(STUDY_A, "v" * 64, "s" * 64)  # another task is a new session


def test_a_ledger_written_before_fingerprints_keeps_every_spend(tmp_path: Path) -> None:
    """An older ledger file (no fingerprint columns) gains them and loses nothing: its
    spends still count, and a new release beside them is charged in full."""
    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE spends (id INTEGER PRIMARY KEY, dataset VARCHAR(128), "
            "study_hash VARCHAR(64), study_name VARCHAR(200), round INTEGER, "
            "task_sha256 VARCHAR(64), sampling_rate FLOAT, noise_multiplier FLOAT, "
            "steps INTEGER, secret_seed BIGINT, recorded_at FLOAT, "
            "UNIQUE (dataset, study_hash, round, task_sha256))"
        )
        db.execute(
            "INSERT INTO spends VALUES (1, 'icu', ?, 'old', 1, ?, 0.1, 1.2, 10, 5, 0.0)",
            (STUDY_A, "t" * 64),
        )
    ledger = PrivacyLedger(path)
    assert ledger.mechanisms("icu") == [ROUND]
    budget = Budget(epsilon=50.0, delta=1e-5)
    new = ledger.reserve("icu", budget, _release(STUDY_A, 2), ROUND)
    assert not new.repeated
    assert new.spent == pytest.approx(epsilon([ROUND] * 2, 1e-5))
