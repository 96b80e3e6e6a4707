"""The DP boundary: what the accountant assumes about one patient's record is what the
mechanism sees, and nothing else computed from the rows leaves a site (issue 12)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedcare.federation.engine import Federation
from fedcare.federation.messages import decode_task, decode_update, encode_task
from fedcare.privacy.dp.guard import PrivacyGuard
from fedcare.privacy.dp.ledger import Budget, BudgetExceededError, PrivacyLedger
from fedcare.privacy.secagg.inmemory import make_identities
from fedcare.privacy.secagg.keys import IdentityVerifier
from fedcare.privacy.secagg.protocol import ServerSession, run_session
from fedcare.privacy.secagg.quantize import decode_sum, quantize_weight
from fedcare.privacy.secagg.study import quantization_for, setup_for, site_weight
from fedcare.privacy.secagg.wire import decode_masked
from fedcare.site.dataset import SiteDataset, prepare_site_data
from fedcare.site.secagg import SecureSite
from fedcare.site.worker import SiteWorker
from fedcare.study import Study, StudyError
from tests.conftest import toy_frame, toy_mapping

DP = {"dp": True, "epsilon": 8.0, "delta": 1e-4}
SECURE = {"enabled": True, "clip_norm": 10.0, "max_sites": 10, "max_records": 1000}
C = 1.0


def _clipped_gradient_sum(data: SiteDataset, w: np.ndarray, b: float) -> np.ndarray:
    """Logistic regression: every training row's gradient, clipped to C, summed."""
    p = 1.0 / (1.0 + np.exp(-(data.x_train.astype(np.float64) @ w + b)))
    g = np.hstack([(p - data.y_train)[:, None] * data.x_train, (p - data.y_train)[:, None]])
    norms = np.linalg.norm(g, axis=1, keepdims=True)
    return (g * np.minimum(1.0, C / np.maximum(norms, 1e-12))).sum(axis=0)


def _with_one_more(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    extra = toy_frame(seed, 1)
    return pd.concat([frame, extra], ignore_index=True)


def test_one_added_patient_moves_the_clipped_gradient_sum_by_at_most_c(toy_study: Study):
    """Issue 12, point 5: with the DP-safe preprocessing (keyed split, the study's own
    scaling and fill values) adding one patient changes no other patient's row, so the
    clipped sum moves by at most C, the sensitivity the accountant assumes."""
    study = toy_study.replace(privacy=DP)
    frame = toy_frame(7, 400)
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=4), 0.3
    worst = 0.0
    for seed in range(20):
        before = prepare_site_data(frame, toy_mapping("alpha"), study)
        after = prepare_site_data(_with_one_more(frame, 1000 + seed), toy_mapping("alpha"), study)
        # Every old record stays where it was, with exactly the same model input.
        assert after.n_train - before.n_train in (0, 1)
        np.testing.assert_array_equal(after.x_train[: before.n_train], before.x_train)
        np.testing.assert_array_equal(after.x_test[: before.n_test], before.x_test)
        moved = _clipped_gradient_sum(after, w, b) - _clipped_gradient_sum(before, w, b)
        worst = max(worst, float(np.linalg.norm(moved)))
    assert worst <= C + 1e-9
    # The same patient under site-fitted scaling and a shuffled split moves everyone.
    # (the check has power: it sees the sensitivity broken there).
    fitted = toy_study.replace(preprocessing={"scaling": "site", "split": "stratified"})
    before = prepare_site_data(frame, toy_mapping("alpha"), fitted)
    worst_fitted = 0.0
    for seed in range(20):
        after = prepare_site_data(_with_one_more(frame, 1000 + seed), toy_mapping("alpha"), fitted)
        moved = _clipped_gradient_sum(after, w, b) - _clipped_gradient_sum(before, w, b)
        worst_fitted = max(worst_fitted, float(np.linalg.norm(moved)))
    assert worst_fitted > 1.5 * C


@pytest.mark.parametrize(
    ("preprocessing", "schema_rule", "message"),
    [
        ({"scaling": "site"}, None, "scaling 'reference' or 'none'"),
        ({"scaling": "reference", "split": "stratified"}, None, "split 'keyed'"),
        ({"scaling": "reference"}, {"rule": "median"}, "declared fill values"),
    ],
)
def test_dp_refuses_preprocessing_fitted_on_the_rows(
    toy_study: Study, preprocessing, schema_rule, message
):
    schema = toy_study.canonical()["schema"]
    if schema_rule is not None:
        schema["features"][2]["missing"] = schema_rule
    with pytest.raises(StudyError, match=message):
        toy_study.replace(schema=schema, preprocessing=preprocessing, privacy=DP)


def test_the_training_loss_does_not_leave_under_dp(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    """Issue 12, point 6: two steps of batch one would put one row's loss in the header."""
    study = toy_study.replace(privacy=DP, training={"steps": 2, "batch_size": 1})
    n_params = study.feature_schema.n_inputs + 1
    federation = Federation(study, [s.name for s in toy_sites], np.zeros(n_params, np.float32))
    _, task = federation.open_round(now=0.0)
    payload = encode_task(task)
    plain = SiteWorker(study, toy_sites[0], n_params).handle(payload)
    assert decode_update(plain, n_params).header.loss is None
    # And not beside a masked input either.
    secure = study.replace(secure_aggregation=SECURE)
    sites = _secure_sites(secure, toy_sites, None)
    round_, task = Federation(secure, sorted(sites), np.zeros(n_params, np.float32)).open_round(
        now=0.0
    )
    payload = encode_task(task)
    setup = setup_for(secure, 1, round_.selected, n_params, hashlib.sha256(payload).hexdigest())
    session = ServerSession(setup, _verifier(sites))
    bodies: list[bytes] = []
    parties = {}
    for name, site in sites.items():
        parties[name] = site.start(payload, setup, on_masked=bodies.append)
    run_session(session, parties)
    assert len(bodies) == 3
    for body in bodies:
        header, _ = decode_masked(body, setup.length, setup.bits)
        assert header.loss is None
    assert set(session.losses.values()) == {None}


def _verifier(sites: dict[str, SecureSite]) -> IdentityVerifier:
    """The consortium CA's check the coordinator runs (the sites' CA)."""
    return next(iter(sites.values())).verifier


def _secure_sites(
    study: Study, data: list[SiteDataset], folder: Path | None
) -> dict[str, SecureSite]:
    n_params = study.feature_schema.n_inputs + 1
    ids = make_identities([s.name for s in data])
    out = {}
    for s in data:
        guard = None
        if folder is not None:
            ledger = PrivacyLedger(folder / f"{s.name}.sqlite")
            guard = PrivacyGuard(ledger, "icu", Budget(1000.0, 1e-4))
        worker = SiteWorker(study, s, n_params, privacy=guard)
        signer = ids.signers[s.name]
        record = guard.ledger if guard is not None else None
        out[s.name] = SecureSite(worker, signer, signer.certificate_pem, ids.verifier, record)
    return out


def test_two_sums_after_a_restart_do_not_give_one_update(
    tmp_path: Path, toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    """Issue 12, point 2: the coordinator restarts and runs the round again over fewer
    survivors. It must issue a new task (the sites refuse a second session for the old
    one), and each site's ledger charges the new task with fresh noise, so the difference
    of the two sums is not the missing site's update."""
    study = toy_study.replace(privacy=DP, secure_aggregation=SECURE)
    sites = _secure_sites(study, toy_sites, tmp_path)
    n_params = study.feature_schema.n_inputs + 1
    federation = Federation(study, sorted(sites), np.zeros(n_params, np.float32))
    plan = quantization_for(study)
    sums = []
    tasks = []
    for offline in (frozenset(), frozenset({"gamma"})):
        round_, task = federation.open_round(now=0.0)  # round 1 both times: a restart
        payload = encode_task(task)
        tasks.append(payload)
        setup = setup_for(study, 1, round_.selected, n_params, hashlib.sha256(payload).hexdigest())
        parties = {n: s.start(payload, setup) for n, s in sites.items() if n not in offline}
        total, _ = run_session(ServerSession(setup, _verifier(sites)), parties)
        sums.append(decode_sum(total, plan)[0])
    assert (
        decode_task(tasks[0], n_params).header.nonce != decode_task(tasks[1], n_params).header.nonce
    )
    # What gamma sent in the first session, recomputed at gamma (the ledger replays the seed).
    gamma = sites["gamma"].worker
    _, update = gamma.train(tasks[0])
    weight = quantize_weight(site_weight(study, update.header.n_samples), plan)
    sent = weight / plan.weight_scale * update.delta.astype(np.float64)
    difference = sums[0] - sums[1]
    bound = plan.error_bound(3) + plan.error_bound(2)
    assert np.linalg.norm(difference - sent) > 1000 * bound
    # Each of alpha and beta released twice, each time charged: count + two rounds.
    for name in ("alpha", "beta"):
        guard = sites[name].worker.privacy
        assert guard is not None
        assert len(guard.ledger.mechanisms("icu")) == 3


def test_the_agent_refuses_a_delta_too_large_before_it_connects(
    tmp_path: Path, toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    from fedcare.site.agent import SiteAgentError, _check_plan

    site = toy_sites[2]  # 80 rows: 60 for training
    study = toy_study.replace(privacy={"dp": True, "epsilon": 4.0, "delta": 0.05})
    guard = PrivacyGuard(PrivacyLedger(tmp_path / "l.sqlite"), "icu", Budget(8.0, 1e-4))
    with pytest.raises(SiteAgentError, match=f"not below 1 / {site.n_train}"):
        _check_plan(study, site.n_train, guard)
    loose = PrivacyGuard(PrivacyLedger(tmp_path / "m.sqlite"), "icu", Budget(8.0, 0.05))
    fine = toy_study.replace(privacy={"dp": True, "epsilon": 4.0, "delta": 1e-4})
    with pytest.raises(
        SiteAgentError, match=r"data set 'icu': the budget's delta 0\.05 is not below"
    ):
        _check_plan(fine, site.n_train, loose)
    # And the guard itself, for any caller: nothing is recorded.
    with pytest.raises(BudgetExceededError, match="not below 1 /"):
        loose.admit(fine, site.n_train, 1, b"task", site.fingerprint, "{}")
    assert loose.ledger.mechanisms("icu") == []
