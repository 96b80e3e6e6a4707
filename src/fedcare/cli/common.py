"""Shared pieces of the command line: consoles, error handling, progress bars."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

console = Console()
errors = Console(stderr=True)

T = TypeVar("T")

ProcessesOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Local processes for the independent runs (default: one per core once the "
        "first run shows the rest would take over 10 s; 1: all in this process).",
    ),
]
RayOption = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="ADDRESS",
        help="Run the independent runs on this Ray cluster ('local' starts one here); needs "
        "fedcare[ray]. The cluster receives the sites' data.",
    ),
]


def check_placement(processes: int | None, ray: str | None) -> None:
    """``--processes`` and ``--ray`` exclude each other."""
    if ray is not None and processes is not None:
        fail("give --processes or --ray, not both (Ray places the runs itself)")


def user_errors() -> tuple[type[Exception], ...]:
    """Errors a user can fix: shown as one clear message, exit status 2, no traceback.

    Imported here rather than at the top so that ``fedcare --help`` stays quick.
    """
    from fedcare.audit import AuditError
    from fedcare.config import ConfigError
    from fedcare.drift.summary import SummaryRefusedError
    from fedcare.federation.state import StateError
    from fedcare.models.builders import ModelError
    from fedcare.models.module import ModelSourceError
    from fedcare.privacy.dp.accountant import AccountingError
    from fedcare.privacy.dp.budget import BudgetExceededError
    from fedcare.privacy.dp.plan import PlanError
    from fedcare.provision import ProvisionError
    from fedcare.releases.bundle import BundleError
    from fedcare.releases.registry import RegistryError
    from fedcare.schema.mapping import DataValidationError, MappingError
    from fedcare.schema.readers import DataFileError
    from fedcare.simulation.cells import RayError
    from fedcare.simulation.pace import PaceError
    from fedcare.simulation.preparation import SitesFileError
    from fedcare.site.agent import SiteAgentError
    from fedcare.site.client import CoordinatorError
    from fedcare.site.dataset import SiteDataError
    from fedcare.site.profiles import ProfileError
    from fedcare.study import StudyError
    from fedcare.training.dp_sgd import UnsupportedModelError

    return (
        StudyError,
        ModelError,
        ModelSourceError,
        UnsupportedModelError,
        ProfileError,
        SummaryRefusedError,
        MappingError,
        DataValidationError,
        DataFileError,
        SiteDataError,
        SitesFileError,
        PaceError,
        RayError,
        ConfigError,
        SiteAgentError,
        CoordinatorError,
        StateError,
        AuditError,
        ProvisionError,
        RegistryError,
        BundleError,
        AccountingError,
        PlanError,
        BudgetExceededError,
        OSError,
    )


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one error line and exit. The text is never read as Rich markup: it quotes
    user data (column names, file contents, log entries)."""
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


def say(text: str) -> None:
    """Print plain text to standard output, never interpreted as markup."""
    console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)


def guarded(fn: Callable[[], T]) -> T:
    """Run ``fn``; a user error becomes a message and exit status 2."""
    try:
        return fn()
    except user_errors() as exc:
        if isinstance(exc, OSError) and exc.filename:
            fail(f"{exc.filename}: {exc.strerror}")
        fail(str(exc))


@contextmanager
def progress_bar() -> Iterator[Callable[[str, int, int], None]]:
    columns = (
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=errors, transient=False) as bar:
        tasks: dict[str, TaskID] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update
