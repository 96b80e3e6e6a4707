"""The site agent: poll the coordinator, train on local data, send the update, repeat.

Outbound connections only. Every network failure is retried with capped
exponential backoff until ``retry_max_s`` has passed without success. The
agent keeps no round state of its own: after a restart it asks for the current
task again, and because local training is deterministic for a round's seed, a
retrained update is byte-identical and the coordinator treats it as a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from fedcare.audit import AuditLog
from fedcare.config import SiteConfig
from fedcare.coordinator.service import decode_model
from fedcare.coordinator.store import write_file_atomically
from fedcare.federation.messages import TaskState
from fedcare.federation.rounds import RoundError
from fedcare.models.size import study_parameter_count
from fedcare.policy import load_policy
from fedcare.policy.approval import site_audit_path
from fedcare.privacy.dp.accountant import AccountingError
from fedcare.privacy.dp.guard import PrivacyGuard
from fedcare.privacy.dp.ledger import Budget, BudgetExceededError, PrivacyLedger
from fedcare.privacy.dp.plan import PlanError
from fedcare.privacy.secagg.keys import SecAggError
from fedcare.releases.bundle import save_site_preprocessing
from fedcare.schema.mapping import load_mapping
from fedcare.schema.readers import read_table
from fedcare.site.client import CoordinatorClient, CoordinatorError, RetryableError
from fedcare.site.dataset import prepare_site_data
from fedcare.site.gate import admit_study
from fedcare.site.secure import secure_site, take_part
from fedcare.site.worker import SiteWorker
from fedcare.study import Study, load_study

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


def _append_jsonl(path: Path, entry: dict[str, object]) -> None:
    """The site's own record of the rounds it trained (for its operators and benchmarks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


@dataclass
class _Validator:
    """Validates the candidate releases this site owes, once each per process."""

    client: CoordinatorClient
    worker: SiteWorker
    audit: AuditLog
    study_hash: str
    retry_max_s: float
    attempted: set[int]

    def run(self) -> None:
        while True:
            task = with_retry(
                lambda: self.client.validation_task(self.study_hash),
                self.retry_max_s,
                "asking for validation work",
            )
            if task is None or task[0] in self.attempted:
                return
            release, payload = task
            self.attempted.add(release)
            reply = self.worker.validate(payload)
            # Recorded before the first byte leaves, like every update.
            self.audit.append(
                "validation.sent",
                study=self.study_hash,
                release=release,
                bytes=len(reply),
                sha256=hashlib.sha256(reply).hexdigest(),
            )
            try:
                stored = with_retry(
                    partial(self.client.send_verdict, self.study_hash, release, reply),
                    self.retry_max_s,
                    f"sending the validation of release {release}",
                )
            except CoordinatorError as exc:
                log.warning("release %d: validation not taken: %s", release, exc.detail)
                continue
            log.info(
                "release %d: validated, %s%s",
                release,
                "passed" if stored["passed"] else "failed",
                "" if stored["passed"] else ": " + "; ".join(stored["reasons"]),
            )


def run_site(config: SiteConfig) -> SiteRunSummary:
    """Take part in the configured study until it finishes."""
    if config.study is None or config.data is None or config.mapping is None:
        raise SiteAgentError("the site config needs study, data and mapping files")
    study = load_study(config.study)
    mapping = load_mapping(config.mapping)
    if mapping.site != config.site:
        raise SiteAgentError(
            f"the mapping is for site '{mapping.site}' but this agent is '{config.site}'"
        )
    data = prepare_site_data(read_table(config.data), mapping, study)
    for notice in data.notices:
        log.warning("data: %s", notice)
    kept = save_site_preprocessing(
        config.state_dir, config.site, study.content_hash, data.preprocessor
    )
    log.info("preprocessing for prediction kept in %s", kept)
    for finding in admit_study(config, study, data):
        log.warning("policy: %s [%s]", finding.message, finding.rule_id)
    assert config.policy is not None  # admit_study refuses a site without a policy
    audit = AuditLog(site_audit_path(config.policy), config.site)
    policy = load_policy(config.policy)
    n_params = study_parameter_count(study)
    guard = _privacy_guard(config)
    _check_plan(study, data.n_train, guard)
    worker = SiteWorker(
        study, data, n_params, policy.validation_gates, policy.min_cohort_size, privacy=guard
    )
    try:
        secure = (
            secure_site(config, worker, guard.ledger) if study.secure_aggregation.enabled else None
        )
    except SecAggError as exc:
        raise SiteAgentError(f"cannot take part in secure aggregation: {exc}") from exc
    study_hash = study.content_hash
    client = CoordinatorClient(str(config.coordinator), config.tls)
    retry_max = config.retry_max_s
    trained = 0
    refused: str | None = None
    declined: set[str] = set()
    try:
        identity = with_retry(client.whoami, retry_max, "connecting to the coordinator")
        if identity != config.site:
            raise SiteAgentError(
                f"this site's certificate identifies '{identity}', not '{config.site}'"
            )
        try:
            with_retry(lambda: client.status(study_hash), retry_max, "fetching the study")
        except CoordinatorError as exc:
            raise SiteAgentError(
                f"the coordinator does not run study {study_hash[:12]} for '{config.site}' "
                f"(if the study file changed, its hash changed too): {exc.detail}"
            ) from exc
        log.info("site %s joined study %s (%s)", config.site, study.name, study_hash[:12])
        validator = _Validator(client, worker, audit, study_hash, retry_max, set())

        def retry(call: Callable[[], T], what: str) -> T:
            return with_retry(call, retry_max, what)

        while True:
            if study.validates_releases:
                validator.run()
            reply = with_retry(lambda: client.task(study_hash), retry_max, "polling for a task")
            if reply.state is TaskState.FINISHED:
                break
            if reply.state is TaskState.WAIT:
                continue
            if refused is not None:
                # The budget is spent: this site sends nothing more and waits for the end.
                time.sleep(REFUSED_POLL_S)
                continue
            if secure is not None:
                task_sha256 = hashlib.sha256(reply.payload).hexdigest()
                if task_sha256 in declined:
                    # A task this site sat out is offered again: it answers nothing more.
                    time.sleep(REFUSED_POLL_S)
                    continue
                try:
                    took_part = take_part(client, secure, reply, n_params, retry, audit)
                except BudgetExceededError as exc:
                    refused = str(exc)
                    audit.append(
                        "update.refused", study=study_hash, round=reply.round, reason=refused
                    )
                    log.warning("round %d: %s", reply.round, refused)
                    continue
                if not took_part:
                    declined.add(task_sha256)
                if took_part:
                    trained += 1
                    _append_jsonl(
                        config.state_dir / "rounds.jsonl",
                        {
                            "round": reply.round,
                            "train_s": secure.train_s,
                            "accepted": True,
                        },
                    )
                continue
            train_started = time.perf_counter()
            try:
                update = worker.handle(reply.payload)
            except BudgetExceededError as exc:
                refused = str(exc)
                audit.append("update.refused", study=study_hash, round=reply.round, reason=refused)
                log.warning("round %d: %s", reply.round, refused)
                continue
            train_s = time.perf_counter() - train_started
            # Recorded before the first byte leaves: a crash can only over-report.
            audit.append(
                "update.sent",
                study=study_hash,
                round=reply.round,
                to=str(config.coordinator),
                bytes=len(update),
                sha256=hashlib.sha256(update).hexdigest(),
            )
            try:
                accepted = with_retry(
                    partial(client.submit, study_hash, reply.round, update),
                    retry_max,
                    f"uploading round {reply.round}",
                )
            except CoordinatorError as exc:
                if exc.status == 409:
                    # The round closed while we trained (deadline): wait for the next one.
                    log.warning("round %d: update not taken: %s", reply.round, exc.detail)
                    continue
                raise
            trained += 1
            _append_jsonl(
                config.state_dir / "rounds.jsonl",
                {"round": reply.round, "train_s": train_s, "accepted": accepted},
            )
            log.info(
                "round %d: trained on %d rows, update %s",
                reply.round,
                data.n_train,
                "accepted" if accepted else "already recorded",
            )
        if study.validates_releases:
            validator.run()
        payload = with_retry(lambda: client.model(study_hash), retry_max, "fetching the model")
        header, _, _ = decode_model(payload, n_params, ())
        if header.study_hash != study_hash:
            raise RoundError("the coordinator returned a model for another study")
        path = config.state_dir / f"model-{study_hash[:16]}.safetensors"
        write_file_atomically(path, payload)
        audit.append(
            "model.received",
            study=study_hash,
            round=header.round,
            sha256=hashlib.sha256(payload).hexdigest(),
        )
        log.info("study finished after round %d; model saved to %s", header.round, path)
        return SiteRunSummary(
            config.site, study_hash, trained, header.round, str(path), refused=refused
        )
    finally:
        client.close()
        guard.ledger.close()


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
