"""Independent cells of a sweep (epsilon, seed, strategy), run in this process, on local
processes or on a Ray cluster, with results in the order of the cells.

A cell is a pure function of the shared inputs and its own key: it returns the same
result wherever it runs, so the three ways give the same table. The shared inputs (the
study and every site's data) are sent to each worker once; a Ray cluster therefore
receives the sites' data and must sit inside the same trust domain as the machine that
holds it. Workers train with one thread each: the parallelism is across cells.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from typing import Any, Generic, TypeVar, cast

Shared = TypeVar("Shared")
Cell = TypeVar("Cell")
Result = TypeVar("Result")

CellProgress = Callable[[int, int], None]
"""Called with (cells done, cells in all) as each cell finishes."""


def _quiet(done: int, total: int) -> None:
    del done, total


class CellTask(Generic[Shared, Cell, Result]):
    """``task(shared, cell)`` for every cell; ``task`` is a module-level function, so that
    other processes can import it by name."""

    def __init__(self, task: Callable[[Shared, Cell], Result], shared: Shared) -> None:
        self.task = task
        self.shared = shared

    def __call__(self, cell: Cell) -> Result:
        return self.task(self.shared, cell)


def default_processes() -> int:
    """One process per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


CHUNK_S = 0.05
"""About how much work, at the first cell's pace, a worker is sent at a time."""

WORTH_SPREADING_S = 10.0
"""By default the cells after the first go to other processes only when, at the first
cell's pace, they would take longer than this here: a process that imports PyTorch
takes seconds to start, more than a short sweep saves."""


def run_cells(
    task: Callable[[Shared, Cell], Result],
    shared: Shared,
    cells: Sequence[Cell],
    *,
    processes: int | None = None,
    ray_address: str | None = None,
    progress: CellProgress = _quiet,
    worth_spreading_s: float | None = None,
    warm_up: int = 0,
    here_too: bool = False,
) -> list[Result]:
    """``task(shared, cell)`` for each cell, in cell order.

    ``ray_address``: on that Ray cluster (``"local"`` starts one on this machine for the
    run; the optional ``fedcare[ray]`` extra). ``processes``: on that many local processes
    (1: all in this process). By default the first cell runs here, and the rest on one
    process per core when they would take more than ``worth_spreading_s`` here (default
    :data:`WORTH_SPREADING_S`); with ``warm_up``, that many cells run here first and the
    pace is read from the one after them (a first cell that pays for lazy imports would
    otherwise spread a few quick ones over workers that cost more to start than they
    save). ``here_too``: this process runs cells as well while the workers start and
    run (for cells that do not train: this process's PyTorch threads would spin against
    the workers'). A cell that raises raises here, as in this process: of several, the
    first in cell order.
    """
    if ray_address is not None:
        return _on_ray(task, shared, cells, ray_address, progress)
    total = len(cells)
    if processes is None:
        if not cells:
            return []
        here = _here(task, shared, cells[: min(warm_up, total - 1)], _offset(progress, 0, total))
        started = time.perf_counter()
        here.append(task(shared, cells[len(here)]))
        pace = time.perf_counter() - started
        done = len(here)
        progress(done, total)
        rest = cells[done:]
        count = min(default_processes(), len(rest))
        worth = WORTH_SPREADING_S if worth_spreading_s is None else worth_spreading_s
        if count > 1 and pace * len(rest) > worth:
            # Short cells go in batches of about CHUNK_S of work: a thousand sites of a
            # few milliseconds each otherwise spend a fifth of their time in messages.
            chunk = max(1, min(int(CHUNK_S / max(pace, 1e-6)), len(rest) // (4 * count)))
            after = _on_processes(
                task, shared, rest, count, _offset(progress, done, total), chunk, here_too
            )
        else:
            after = _here(task, shared, rest, _offset(progress, done, total))
        return [*here, *after]
    if min(processes, total) <= 1:
        return _here(task, shared, cells, progress)
    return _on_processes(task, shared, cells, min(processes, total), progress, here_too=here_too)


def _offset(progress: CellProgress, done: int, total: int) -> CellProgress:
    """Progress of a tail of the cells, reported against all of them."""
    return lambda finished, _: progress(done + finished, total)


def _here(
    task: Callable[[Shared, Cell], Result],
    shared: Shared,
    cells: Sequence[Cell],
    progress: CellProgress,
) -> list[Result]:
    results = []
    for done, cell in enumerate(cells, start=1):
        results.append(task(shared, cell))
        progress(done, len(cells))
    return results


_WORKER: dict[str, CellTask[Any, Any, Any]] = {}
"""The task and shared inputs of this worker process, set once when it starts."""


_ONE_THREAD = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def one_thread_each() -> None:
    """PyTorch and the BLAS under numpy on one thread in this process. A worker per core
    whose BLAS kept a thread per core as well spun them against each other: a heart
    benchmark cell took 18-21 s on two workers against 7 s alone. PyTorch is limited now
    if loaded, else by the environment it reads when a task first imports it: a task
    that never trains (preparing a site's data) does not pay a second to load it."""
    from threadpoolctl import threadpool_limits

    for name in _ONE_THREAD:
        os.environ[name] = "1"
    threadpool_limits(1)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _start_worker(job: CellTask[Any, Any, Any]) -> None:
    one_thread_each()
    _WORKER["job"] = job


def _run_in_worker(cells: Sequence[object]) -> tuple[list[object], BaseException | None]:
    """The results of ``cells`` in order, up to the first that raises, and its error."""
    return _run_chunk(_WORKER["job"], cells)


def _run_chunk(
    job: CellTask[Any, Any, Any], cells: Sequence[object]
) -> tuple[list[object], BaseException | None]:
    done = []
    for cell in cells:
        try:
            done.append(job(cell))
        except Exception as error:  # returned with its position, raised by the caller
            return done, error
    return done, None


def _on_processes(
    task: Callable[[Shared, Cell], Result],
    shared: Shared,
    cells: Sequence[Cell],
    count: int,
    progress: CellProgress,
    chunk: int = 1,
    here_too: bool = False,
) -> list[Result]:
    # Spawned, not forked: a fork of a process that has started PyTorch's threads can hang.
    context = multiprocessing.get_context("spawn")
    job = CellTask(task, shared)
    pool = ProcessPoolExecutor(count, context, initializer=_start_worker, initargs=(job,))
    results: dict[int, Result] = {}
    failed: dict[int, BaseException] = {}
    with pool:
        futures = {
            pool.submit(_run_in_worker, cells[start : start + chunk]): start
            for start in range(0, len(cells), chunk)
        }

        def take(start: int, done: list[object], error: BaseException | None) -> None:
            results.update((start + k, cast(Result, r)) for k, r in enumerate(done))
            if error is None:
                if not failed:
                    progress(len(results), len(cells))
                return
            failed[start + len(done)] = error
            # The cells after the first failure need not run; those before it still
            # do, as one of them may fail first in cell order.
            first = min(failed)
            for other, position in futures.items():
                if position > first:
                    other.cancel()

        def harvest(future: Future[tuple[list[object], BaseException | None]]) -> None:
            start = futures.pop(future)
            if future.cancelled():
                return
            error = future.exception()
            take(start, *(future.result() if error is None else ([], error)))

        if here_too:
            # The workers take chunks from the front; this process, while they start and
            # after, takes them from the back, as long as one is still waiting for a worker.
            for future in reversed(list(futures)):
                if failed or not future.cancel():
                    break
                start = futures.pop(future)
                take(start, *_run_chunk(job, cells[start : start + chunk]))
                for finished in [f for f in futures if f.done()]:
                    harvest(finished)
        # as_completed waits on all the futures once; wait(FIRST_COMPLETED) in a loop
        # re-registers on every pending one each time, which at a thousand cells kept
        # this process busy on a core the workers needed.
        for future in as_completed(list(futures)):
            harvest(future)
    if failed:
        raise failed[min(failed)]
    return [results[i] for i in range(len(cells))]


def _run_on_ray(job: CellTask[Any, Any, Any], cell: object) -> object:
    one_thread_each()
    return job(cell)


def _on_ray(
    task: Callable[[Shared, Cell], Result],
    shared: Shared,
    cells: Sequence[Cell],
    address: str,
    progress: CellProgress,
) -> list[Result]:
    try:
        import ray
    except ImportError as exc:
        raise RayError(
            "--ray needs Ray: pip install 'fedcare[ray]' (on this machine and every node)"
        ) from exc
    _check_listening(address)
    try:
        if address == "local":
            # A dashboard only for a cluster started here; a running cluster keeps its own.
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RayError(f"cannot use the Ray cluster at '{address}': {first}") from exc
    try:
        job = ray.put(CellTask(task, shared))
        remote = ray.remote(num_cpus=1)(_run_on_ray)
        refs = [remote.remote(job, cell) for cell in cells]
        index = {ref: i for i, ref in enumerate(refs)}
        results: dict[int, Result] = {}
        pending = list(refs)
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            for ref in finished:
                results[index[ref]] = cast(Result, ray.get(ref))
            progress(len(results), len(cells))
        return [results[i] for i in range(len(cells))]
    finally:
        ray.shutdown()


def _check_listening(address: str) -> None:
    """Refuse at once a ``host:port`` where nothing listens (Ray itself retries for minutes)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return  # "local", "auto": Ray resolves these itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise RayError(f"no Ray cluster answers at '{address}': {exc.strerror or exc}") from exc


class RayError(RuntimeError):
    """``--ray`` was asked for and Ray is not installed or its cluster cannot be reached."""
