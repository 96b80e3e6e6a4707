"""The review as a readable Rich report for ``fedcare site review`` and ``site approve``.

Every text that comes from a file (study name, column names, notes) is escaped,
so a bracket in a study name prints as a bracket rather than as Rich markup.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedcare.policy.findings import Finding, Severity
from fedcare.policy.review import StudyReview
from fedcare.study import TrainingSpec


def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("MB", 1_000_000), ("kB", 1_000)):
        if n >= size:
            return f"{n:,} B ({n / size:.1f} {unit})"
    return f"{n:,} B"


def _training(spec: TrainingSpec) -> str:
    amount = f"{spec.epochs} epoch(s)" if spec.epochs is not None else f"{spec.steps} step(s)"
    text = (
        f"{amount} per round, batch {spec.batch_size}, {spec.optimizer.value} "
        f"lr {spec.learning_rate:g}"
    )
    if spec.momentum:
        text += f", momentum {spec.momentum:g}"
    if spec.weight_decay:
        text += f", weight decay {spec.weight_decay:g}"
    if spec.proximal_mu:
        text += f", FedProx mu {spec.proximal_mu:g}"
    return text


def print_findings(findings: Iterable[Finding], console: Console) -> None:
    """One table row per finding: severity, rule, what is wrong, and the rule's source."""
    rows = list(findings)
    if not rows:
        console.print("[green]no rule refuses or warns about this study[/]")
        return
    table = Table(show_lines=True)
    for header in ("", "rule", "finding", "source"):
        table.add_column(header)
    for finding in rows:
        mark = "[bold red]refuse[/]" if finding.severity is Severity.REFUSE else "[yellow]warn[/]"
        table.add_row(
            mark, escape(finding.rule_id), escape(finding.message), escape(finding.source)
        )
    console.print(table)


def print_review(review: StudyReview, console: Console) -> None:
    """The whole review, in the order an officer reads it."""
    console.print(
        f"[bold]Study review[/]: {escape(review.study_name)} at site {escape(review.site)} "
        f"({review.jurisdiction.value.upper()}: {escape(review.profile_title)})"
    )
    console.print(f"hash     {review.study_hash}")
    if review.approval is not None:
        console.print(
            f"status   [green]approved[/] by {escape(review.approval.approved_by)} at "
            f"{review.approval.approved_at:%Y-%m-%d %H:%M} UTC"
        )
    else:
        console.print("status   not approved at this site")
    if review.description:
        console.print(escape(review.description), style="dim")

    console.rule("What will run")
    model = review.model
    shape = f" hidden {list(model.hidden)}" if model.hidden else ""
    console.print(
        f"model    {model.kind.value}{shape}, {model.n_inputs} inputs, "
        f"{model.n_params:,} parameters"
    )
    console.print(f"training {_training(review.training)}")
    aggregation = review.aggregation
    console.print(
        f"server   {aggregation.strategy.value} (server lr "
        f"{aggregation.effective_learning_rate:g}), weighting {aggregation.weighting.value}"
    )
    rounds = review.rounds
    console.print(
        f"rounds   {rounds.count}, at least {rounds.min_sites} site(s) each, "
        f"{rounds.fraction:.0%} of sites per round, deadline {rounds.deadline_s:g} s"
    )

    console.rule("Columns read at this site")
    columns = Table()
    for header in ("role", "column", "type", "unit", "valid values", "if missing", "local column"):
        columns.add_column(header)
    for column in review.columns:
        valid = (
            f"{column.range[0]:g} to {column.range[1]:g}"
            if column.range
            else ", ".join(column.categories or ())
        )
        local = column.local_column or "—"
        if column.local_unit and column.local_unit != column.unit:
            local += f" ({column.local_unit})"
        columns.add_row(
            column.role,
            escape(column.name),
            column.type or "",
            escape(column.unit or ""),
            escape(valid),
            column.missing or "",
            escape(local),
        )
    console.print(columns)

    console.rule("What leaves the site")
    outflows = Table()
    for header in ("what", "per round", "rounds (at most)", "total", "details"):
        outflows.add_column(header, justify="right" if header in ("per round", "total") else "left")
    for outflow in review.outflows:
        outflows.add_row(
            outflow.artefact.value,
            _bytes(outflow.bytes_per_round),
            "—" if outflow.rounds is None else str(outflow.rounds),
            _bytes(outflow.total_bytes),
            escape(outflow.description),
        )
    console.print(outflows)
    where = escape(review.coordinator_url or "not given (site.yaml names it; checked on connect)")
    console.print(f"coordinator {where}, region {review.coordinator_region or 'not declared'}")
    console.print(
        "smallest group behind a released number: the study allows "
        f"{review.study_min_cohort_size}, this site requires {review.required_min_cohort_size}"
    )

    console.rule("Privacy cost")
    console.print(escape(review.privacy.statement))
    for dataset, budget in review.privacy.budget.items():
        console.print(
            f"budget   {escape(dataset)}: epsilon {budget.epsilon:g}, delta {budget.delta:g}"
        )
    _print_plan(review, console)

    console.rule("Policy findings")
    print_findings(review.findings, console)
    for note in review.notes:
        console.print(f"note: {escape(note)}", style="yellow")

    if review.approvable:
        console.print("[bold green]approvable[/]: no rule refuses this study")
    else:
        ids = ", ".join(dict.fromkeys(f.rule_id for f in review.refusals))
        console.print(f"[bold red]refused[/] by {escape(ids)}")


def _print_plan(review: StudyReview, console: Console) -> None:
    privacy = review.privacy
    if privacy.plan_problem is not None:
        console.print(f"DP plan at this site: refused: {escape(privacy.plan_problem)}", style="red")
    review_plan = privacy.plan
    if review_plan is None:
        if privacy.differentially_private and privacy.plan_problem is None:
            console.print("DP plan: give --data (with --mapping) or --rows to compute it here")
        return
    plan = review_plan.plan
    count = (
        "none (sites weighted equally)"
        if plan.count_noise is None
        else f"once, noise std {plan.count_noise:g}: epsilon {review_plan.count_epsilon:.4g}"
    )
    console.print(
        f"DP plan at this site ({review_plan.training_rows} training rows, "
        f"{plan.accountant.value}, delta {plan.delta:g}):\n"
        f"  sampling rate {plan.sampling_rate:.4g}, {plan.steps_per_round} steps per round, "
        f"{plan.rounds} rounds, noise multiplier {plan.noise_multiplier:.4g}, "
        f"clipping {plan.max_grad_norm:g}\n"
        f"  record count released {count}\n"
        f"  epsilon per round {review_plan.round_epsilon:.4g}; "
        f"whole study {review_plan.study_epsilon:.4g}"
    )
    table = Table()
    for header in ("data set", "budget", "study spends", "rounds affordable", "problem"):
        table.add_column(header)
    for fit in review_plan.budgets:
        table.add_row(
            escape(fit.dataset),
            f"epsilon {fit.epsilon:g}, delta {fit.delta:g} ({fit.accountant})",
            f"{fit.study_epsilon:.4g}",
            f"{fit.rounds_affordable} of {plan.rounds}",
            escape(fit.problem or ""),
        )
    if review_plan.budgets:
        console.print(table)
