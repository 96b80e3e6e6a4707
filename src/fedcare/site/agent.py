"""The site agent: a :class:`~fedcare.site.participant.Participant` over HTTPS.

Outbound connections only. Every network failure is retried with capped
exponential backoff until ``retry_max_s`` has passed without success. The
agent keeps no round state of its own: after a restart it asks for the current
task again, and because local training is deterministic for a round's seed, a
retrained update is byte-identical and the coordinator treats it as a duplicate.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import pandas as pd

from fedcare import pki
from fedcare.audit import AuditLog, load_trusted_head
from fedcare.config import SiteConfig
from fedcare.durable import write_file_atomically
from fedcare.federation.messages import Withdrawal, WithdrawReason, decode_model, encode_model
from fedcare.models.builders import ModelError, check_model
from fedcare.models.module import ModelSourceError
from fedcare.models.size import study_parameter_count
from fedcare.policy import load_policy
from fedcare.policy.approval import is_approved, site_audit_path
from fedcare.privacy.dp.accountant import AccountingError
from fedcare.privacy.dp.guard import PrivacyGuard
from fedcare.privacy.dp.ledger import Budget, BudgetExceededError, PrivacyLedger
from fedcare.privacy.dp.plan import PlanError
from fedcare.privacy.secagg.keys import SecAggError
from fedcare.releases.bundle import save_site_preprocessing
from fedcare.schema.mapping import DataValidationError
from fedcare.site.client import CoordinatorClient, CoordinatorError, RetryableError
from fedcare.site.dataset import SiteDataError, prepare_site_data
from fedcare.site.fingerprint import (
    DataFingerprint,
    check_data_fingerprint,
    source_digest,
    source_label,
)
from fedcare.site.gate import admit_study
from fedcare.site.participant import Participant, Step
from fedcare.site.personal import release_personal
from fedcare.site.profiles import ProfileStore
from fedcare.site.revocation import PeerRevocations
from fedcare.site.secagg import secure_site
from fedcare.site.worker import SiteWorker
from fedcare.sources.load import read_source
from fedcare.study import Study, load_study
from fedcare.training.dp_sgd import UnsupportedModelError
from fedcare.training.local import check_dp_model

log = logging.getLogger("fedcare.site")
T = TypeVar("T")
REFUSED_POLL_S = 5.0
"""How often a site whose budget is spent asks whether the study has finished."""


class SiteAgentError(RuntimeError):
    """The agent cannot go on: misconfiguration, refusal, or the coordinator gone too long."""


@dataclass(frozen=True)
class SiteRunSummary:
    site: str
    study_hash: str
    rounds_trained: int
    final_round: int
    model_path: str
    refused: str | None = None
    """Why this site stopped sending updates (its privacy budget), if it did."""
    personal_model_path: str | None = None
    """With the study's personalization: where this site's personal model is kept."""


def with_retry(
    call: Callable[[], T],
    retry_max_s: float,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``call``, retrying :class:`RetryableError` failures with capped, jittered backoff."""
    first_failure: float | None = None
    attempt = 0
    while True:
        try:
            return call()
        except RetryableError as exc:
            now = time.monotonic()
            first_failure = first_failure or now
            if now - first_failure > retry_max_s:
                raise SiteAgentError(
                    f"gave up on {what} after {retry_max_s:.0f} s of failures: {exc}"
                ) from exc
            delay = min(10.0, 0.25 * 2**attempt) * (0.5 + random.random() / 2)
            attempt += 1
            log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
            sleep(delay)


def run_site(config: SiteConfig) -> SiteRunSummary:
    """Take part in the configured study until it finishes."""
    source = config.data_source
    if config.study is None or source is None or config.mapping is None:
        raise SiteAgentError("the site config needs study, data (or source) and mapping files")
    study = load_study(config.study)
    try:
        table = read_source(source, config.mapping, study.feature_schema)
        if table.mapping.site != config.site:
            raise SiteAgentError(
                f"the mapping is for site '{table.mapping.site}' but this agent is '{config.site}'"
            )
        data = prepare_site_data(table.frame, table.mapping, study, table.notices)
    except (DataValidationError, SiteDataError) as exc:
        _withdraw_for_data(config, study)
        raise SiteAgentError(f"the site's data does not fit study '{study.name}': {exc}") from exc
    for notice in data.notices:
        log.warning("data: %s", notice)
    kept = save_site_preprocessing(
        config.state_dir, config.site, study.content_hash, data.preprocessor
    )
    log.info("preprocessing for prediction kept in %s", kept)
    for finding in admit_study(config, study, data):
        log.warning("policy: %s [%s]", finding.message, finding.rule_id)
    try:
        check_model(study)  # before any connection: the installed model is the approved one
        check_dp_model(study)
    except (ModelError, ModelSourceError, UnsupportedModelError) as exc:
        raise SiteAgentError(f"cannot run study '{study.name}': {exc}") from exc
    policy_path = config.policy
    assert policy_path is not None  # admit_study refuses a site without a policy
    head = (
        None if config.audit_head is None else load_trusted_head(config.audit_head, config.tls.cert)
    )
    audit = AuditLog(site_audit_path(policy_path), config.site, trusted_head=head)
    _check_fingerprint(config, study, table.frame, data.n_train, audit)
    policy = load_policy(policy_path)
    n_params = study_parameter_count(study)
    guard = _privacy_guard(config)
    _check_plan(study, data.n_train, guard)
    worker = SiteWorker(
        study, data, n_params, policy.validation_gates, policy.min_cohort_size, privacy=guard
    )
    client = CoordinatorClient(str(config.coordinator), config.tls)
    revoked = PeerRevocations(client.crl, pki.load_certificate(config.tls.ca))
    try:
        secure = (
            secure_site(config, worker, guard.ledger, revoked)
            if study.secure_aggregation.enabled
            else None
        )
    except SecAggError as exc:
        client.close()
        raise SiteAgentError(f"cannot take part in secure aggregation: {exc}") from exc
    study_hash = study.content_hash
    retry_max = config.retry_max_s

    def retry(call: Callable[[], T], what: str) -> T:
        return with_retry(call, retry_max, what)

    try:
        _join(client, config, study, retry_max)
        participant = Participant(
            worker,
            client,
            secure=secure,
            audit=audit,
            recipient=str(config.coordinator),
            retry=retry,
            approved=lambda: is_approved(load_policy(policy_path), study_hash),
            rounds_log=config.state_dir / "rounds.jsonl",
            profiles=ProfileStore(config.state_dir, study_hash),
        )
        while (step := participant.step()) is not Step.FINISHED:
            if step is Step.HOLD:
                time.sleep(REFUSED_POLL_S)
        path = config.state_dir / f"model-{study_hash[:16]}.safetensors"
        write_file_atomically(path, participant.final_model)
        log.info("study finished after round %d; model saved to %s", participant.final_round, path)
        personal = _save_personal(config, study, worker, participant, audit)
        return SiteRunSummary(
            config.site,
            study_hash,
            participant.trained,
            participant.final_round,
            str(path),
            refused=participant.refused,
            personal_model_path=personal,
        )
    finally:
        client.close()
        guard.ledger.close()


def _save_personal(
    config: SiteConfig,
    study: Study,
    worker: SiteWorker,
    participant: Participant,
    audit: AuditLog,
) -> str | None:
    """The site's personal model, kept in its state folder (it is never sent), validated
    under the study's and the site's gates beside the global model: released at this
    site if it passes, held if not (``personal-*.json`` says which, and why)."""
    spec = study.personalization
    if spec is None:
        return None
    _, final, _ = decode_model(participant.final_model, worker.n_params)
    personal = worker.personal_model(final)
    if personal is None:
        log.warning("no personal model: this site trained no round of the study")
        return None
    payload = encode_model(study.content_hash, participant.final_round, personal)
    stem = config.state_dir / f"personal-{study.content_hash[:16]}"
    path = stem.with_suffix(".safetensors")
    release = release_personal(
        study,
        worker.data,
        personal,
        final,
        participant.final_round,
        worker.site_gates,
        worker.min_cohort,
    )
    write_file_atomically(path, payload)
    write_file_atomically(stem.with_suffix(".json"), release.model_dump_json(indent=2).encode())
    audit.append(
        "model.personalized",
        study=study.content_hash,
        method=spec.method.value,
        round=participant.final_round,
        sha256=hashlib.sha256(payload).hexdigest(),
        released=release.released,
        reasons=release.verdict.reasons,
    )
    log.info(
        "personal model (%s) saved to %s; it stays at this site; %s",
        spec.method.value,
        path,
        release.summary(),
    )
    return str(path)


def _check_fingerprint(
    config: SiteConfig, study: Study, frame: pd.DataFrame, n_train: int, audit: AuditLog
) -> None:
    rows = len(frame)
    source = config.data_source
    assert source is not None  # run_site checked
    current = DataFingerprint(sha256=source_digest(source, frame), rows=rows, n_train=n_train)
    previous = check_data_fingerprint(config.state_dir, study.content_hash, current, audit)
    if previous is not None:
        log.warning(
            "data: %s changed since this site last ran study %s: %d -> %d rows, sha256 "
            "%s... -> %s...; training goes on with the file as it is now, and the change is "
            "in the site's audit trail",
            source_label(source),
            study.name,
            previous.rows,
            rows,
            previous.sha256[:12],
            current.sha256[:12],
        )


def _join(client: CoordinatorClient, config: SiteConfig, study: Study, retry_max: float) -> None:
    """Check who the certificate says this site is, and that the coordinator runs the study."""
    identity = with_retry(client.whoami, retry_max, "connecting to the coordinator")
    if identity != config.site:
        raise SiteAgentError(
            f"this site's certificate identifies '{identity}', not '{config.site}'"
        )
    study_hash = study.content_hash
    try:
        with_retry(lambda: client.status(study_hash), retry_max, "fetching the study")
    except CoordinatorError as exc:
        raise SiteAgentError(
            f"the coordinator does not run study {study_hash[:12]} for '{config.site}' "
            f"(if the study file changed, its hash changed too): {exc.detail}"
        ) from exc
    log.info("site %s joined study %s (%s)", config.site, study.name, study_hash[:12])


def _withdraw_for_data(config: SiteConfig, study: Study) -> None:
    """Tell the coordinator, by category only, that this site's data does not fit: the
    study then stops waiting for it. Best effort: the data error is what the operator
    needs to see, whether or not the coordinator answers. Only for a study the site's
    policy approves: a study it does not approve never learns the site exists."""
    if config.policy is None or not is_approved(load_policy(config.policy), study.content_hash):
        return
    client = CoordinatorClient(str(config.coordinator), config.tls)
    message = Withdrawal(
        study_hash=study.content_hash, site=config.site, reason=WithdrawReason.DATA
    )
    try:
        client.withdraw(study.content_hash, message.model_dump_json().encode())
        log.warning("told the coordinator this site withdraws (its data does not fit)")
    except (RetryableError, CoordinatorError, OSError) as exc:
        log.warning("could not tell the coordinator this site withdraws: %s", exc)
    finally:
        client.close()


def _check_plan(study: Study, n_train: int, guard: PrivacyGuard) -> None:
    """Refuse, before connecting, a DP study this site cannot run (``PrivacyGuard.check``)."""
    try:
        guard.check(study, n_train)
    except (PlanError, AccountingError, BudgetExceededError) as exc:
        guard.ledger.close()
        raise SiteAgentError(f"cannot run study '{study.name}' here: {exc}") from exc


def _privacy_guard(config: SiteConfig) -> PrivacyGuard:
    """The site's ledger, and its policy's budget for the data set this agent reads."""
    assert config.policy is not None
    dataset = config.dataset_name
    allowed = load_policy(config.policy).privacy_budget.get(dataset)
    budget = None if allowed is None else Budget(allowed.epsilon, allowed.delta, allowed.accountant)
    return PrivacyGuard(PrivacyLedger(config.ledger_path), dataset, budget)
