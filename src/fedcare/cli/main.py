"""The ``fedcare`` command: the app, its global options, and its command groups."""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Annotated, NoReturn

import typer

from fedcare.cli.audit import audit_app
from fedcare.cli.benchmark import benchmark_app
from fedcare.cli.calibrate import calibrate
from fedcare.cli.checks import data_app, study_app
from fedcare.cli.deploy import coordinator_app, provision_app
from fedcare.cli.init import init
from fedcare.cli.predict import predict
from fedcare.cli.privacy import privacy_app
from fedcare.cli.release import release_app
from fedcare.cli.simulation import demo, simulate
from fedcare.cli.site import site_app

app = typer.Typer(
    help="fedcare: federated learning between hospitals.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(
    threads: Annotated[
        int, typer.Option(min=1, envvar="FEDCARE_THREADS", help="CPU threads for PyTorch.")
    ] = 1,
) -> None:
    """fedcare: federated learning between hospitals."""
    # Site models are small: with several threads, per-batch synchronisation
    # costs more than the arithmetic (measured 4x slower on 2 cores). PyTorch reads
    # this when it is first imported, so commands that never train (data check,
    # init, release) do not pay for importing it here.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


app.command()(demo)
app.command()(simulate)
app.add_typer(provision_app, name="provision")
app.command()(calibrate)
app.command()(predict)
app.command()(init)
app.add_typer(study_app, name="study")
app.add_typer(data_app, name="data")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(site_app, name="site")
app.add_typer(audit_app, name="audit")
app.add_typer(release_app, name="release")
app.add_typer(benchmark_app, name="benchmark")
app.add_typer(privacy_app, name="privacy")


def run() -> NoReturn:
    """The ``fedcare`` executable: run the app, then exit with its status."""
    try:
        app()
    except SystemExit as done:
        _exit(done.code)
    _exit(0)


def _exit(code: str | int | None) -> NoReturn:
    """Exit without PyTorch's interpreter teardown when nothing is left running.

    Once PyTorch is loaded, the interpreter's teardown (its C++ libraries' static
    destructors and module clearing) takes 0.4-0.6 s, longer than a small
    simulation. All of fedcare's state is committed by then: the exit handlers
    still run (log handlers, temporary directories, coverage), and the streams are
    flushed, so skipping the teardown loses nothing. With another thread alive, the
    normal exit waits for it as usual; under a profiler or a tracer, which write
    their results after the program returns, so does the exit.
    """
    watched = sys.getprofile() is not None or sys.gettrace() is not None
    if "torch" not in sys.modules or threading.active_count() > 1 or watched:
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
    status = code if isinstance(code, int) else (0 if code is None else 1)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
