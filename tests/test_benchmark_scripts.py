"""The benchmark scripts still run against the code they measure, at a size a test affords."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_secagg_benchmark_measures_a_small_point_with_dropouts() -> None:
    secagg = _load("secagg")
    result = secagg.measure(6, 2_000, 1 / 3, "complete")
    # Four survivors: their own four self-masks, and two dropped sites' pairwise
    # masks with each of them.
    assert result["masks_removed"] == 4 + 2 * 4
    assert result["max_abs_error_of_mean"] < 1e-4
    assert result["keystream_floor_s"] > 0
    assert result["unmask_s"] > 0
    assert result["upload_ratio"] > 1
