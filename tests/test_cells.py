"""A sweep's cells: the same results, in cell order, in this process and on local processes."""

from __future__ import annotations

import os
import sys

import pytest

from fedcare.simulation.cells import RayError, run_cells


def _where(offset: int, cell: int) -> tuple[int, int]:
    """A cell's value and the process that computed it."""
    if cell < 0:
        raise ValueError(f"cell {cell} refused")
    return offset + cell * cell, os.getpid()


def test_serial_cells_run_here_in_order_with_progress() -> None:
    seen: list[tuple[int, int]] = []
    results = run_cells(
        _where, 10, [3, 1, 2], processes=1, progress=lambda d, t: seen.append((d, t))
    )
    assert [value for value, _ in results] == [19, 11, 14]
    assert {pid for _, pid in results} == {os.getpid()}
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_cells_on_local_processes_come_back_in_cell_order() -> None:
    seen: list[tuple[int, int]] = []
    cells = list(range(8, 0, -1))
    results = run_cells(_where, 5, cells, processes=2, progress=lambda d, t: seen.append((d, t)))
    assert [value for value, _ in results] == [5 + c * c for c in cells]
    pids = {pid for _, pid in results}
    assert os.getpid() not in pids
    assert 1 <= len(pids) <= 2
    assert seen[-1] == (8, 8)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_this_process_helps_from_the_back_with_the_same_results_in_order() -> None:
    seen: list[tuple[int, int]] = []
    cells = list(range(12))
    results = run_cells(
        _where,
        5,
        cells,
        processes=2,
        here_too=True,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert [value for value, _ in results] == [5 + c * c for c in cells]
    pids = [pid for _, pid in results]
    # The pool hands its first chunks to the workers at once; the ones still waiting
    # when this process looks (the back) it runs itself, long before a worker starts.
    assert pids[-1] == os.getpid()
    assert any(pid != os.getpid() for pid in pids)
    assert seen[-1] == (12, 12)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_helping_here_a_failing_cell_still_fails_first_in_cell_order() -> None:
    with pytest.raises(ValueError, match="cell -1 refused"):
        run_cells(_where, 0, [1, 2, 3, 4, -1, 6, -2], processes=2, here_too=True)
    with pytest.raises(ValueError, match="cell -1 refused"):
        run_cells(_where, 0, [-1, 2, 3, 4, 5, 6, -2], processes=2, here_too=True)


def test_a_failing_cell_fails_the_sweep_with_its_error() -> None:
    with pytest.raises(ValueError, match="cell -1 refused"):
        run_cells(_where, 0, [1, -1, 2], processes=2)
    with pytest.raises(ValueError, match="cell -1 refused"):
        run_cells(_where, 0, [1, -1], processes=1)


def test_ray_without_ray_installed_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(RayError, match=r"pip install 'fedcare\[ray\]'"):
        run_cells(_where, 0, [1], ray_address="local")


def test_ray_where_no_cluster_listens_is_one_clear_error() -> None:
    from fedcare.simulation.loopback import free_port

    with pytest.raises(RayError, match=r"no Ray cluster answers at '127\.0\.0\.1:\d+'"):
        run_cells(_where, 0, [1], ray_address=f"127.0.0.1:{free_port()}")


def test_by_default_a_short_sweep_stays_here_and_a_long_one_spreads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    short = run_cells(_where, 1, [1, 2, 3])
    assert [value for value, _ in short] == [2, 5, 10]
    assert {pid for _, pid in short} == {os.getpid()}
    # As if each cell took long: the first runs here, the rest on other processes.
    monkeypatch.setattr("fedcare.simulation.cells.WORTH_SPREADING_S", 0.0)
    seen: list[int] = []
    long = run_cells(_where, 1, [1, 2, 3, 4], progress=lambda d, t: seen.append(d))
    assert [value for value, _ in long] == [2, 5, 10, 17]
    assert long[0][1] == os.getpid()
    assert os.getpid() not in {pid for _, pid in long[1:]}
    assert seen[0] == 1
    assert seen[-1] == 4


def _threads(_: int, cell: int) -> tuple[int, int, int]:
    """The process, its PyTorch threads and its largest BLAS thread pool."""
    import torch
    from threadpoolctl import threadpool_info

    blas = max((pool["num_threads"] for pool in threadpool_info()), default=1)
    return os.getpid(), torch.get_num_threads(), blas


def test_a_local_worker_runs_torch_and_blas_on_one_thread() -> None:
    # A worker per core with a BLAS thread per core as well ran three times slower.
    results = run_cells(_threads, 0, [1, 2, 3, 4], processes=2)
    assert os.getpid() not in {pid for pid, _, _ in results}
    assert {(torch, blas) for _, torch, blas in results} == {(1, 1)}


def test_cells_sent_in_batches_keep_order_and_the_first_failure() -> None:
    """Short cells go to workers several at a time: the results are still in cell
    order, and of failures in different batches the first in cell order is raised."""
    from fedcare.simulation.cells import _on_processes

    def progress(done: int, total: int) -> None:
        del done, total

    cells = list(range(11))
    results = _on_processes(_where, 3, cells, 2, progress, chunk=4)
    assert [value for value, _ in results] == [3 + c * c for c in cells]
    failing = [1, 2, 3, 4, 5, -6, 7, 8, -9, 10]
    with pytest.raises(ValueError, match="cell -6 refused"):
        _on_processes(_where, 0, failing, 2, progress, chunk=3)
    with pytest.raises(ValueError, match="cell -2 refused"):
        _on_processes(_where, 0, [1, -2, -3, 4], 2, progress, chunk=4)


def _slow_first(_: int, cell: int) -> tuple[int, int]:
    """Cell 0 is slow, as a first cell is that pays for lazy imports; the others quick."""
    import time

    if cell == 0:
        time.sleep(0.3)
    return cell, os.getpid()


def test_a_warm_up_cell_keeps_a_slow_first_cell_from_spreading_quick_ones() -> None:
    cells = list(range(6))
    seen: list[tuple[int, int]] = []
    # At the first cell's pace the five others would take 1.5 s: spread.
    spread = run_cells(_slow_first, 0, cells, worth_spreading_s=1.0)
    assert [value for value, _ in spread] == cells
    assert os.getpid() not in {pid for _, pid in spread[1:]}
    # Paced by the second cell, they take milliseconds: all here, progress in order.
    here = run_cells(
        _slow_first,
        0,
        cells,
        worth_spreading_s=1.0,
        warm_up=1,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert [value for value, _ in here] == cells
    assert {pid for _, pid in here} == {os.getpid()}
    assert seen == [(d, 6) for d in range(1, 7)]
    assert run_cells(_slow_first, 0, [4], warm_up=1) == [(4, os.getpid())]
