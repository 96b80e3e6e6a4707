"""The round-0 global model for a process that does not load PyTorch: the coordinator.

Logistic regression starts at zero, which needs no library. Any other model starts
from PyTorch's seeded initialisation; a process that has not imported PyTorch gets
it from a short-lived child process (``python -m fedcare.models.initial``), so the
long-running coordinator keeps neither PyTorch's import time nor its memory. The
vector is bit-for-bit the one :func:`fedcare.models.builders.initial_parameters`
gives in-process.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from numpy.typing import NDArray

from fedcare.models.size import study_parameter_count
from fedcare.study import ModelKind, Study

_TIMEOUT_S = 300.0


class InitialModelError(RuntimeError):
    """The child process could not build the study's model."""


def round_zero_parameters(study: Study) -> NDArray[np.float32]:
    """The study's round-0 parameters, without importing PyTorch into this process
    unless it is already loaded."""
    if study.model.kind is ModelKind.LOGISTIC_REGRESSION:
        return np.zeros(study_parameter_count(study), dtype=np.float32)
    if "torch" in sys.modules:
        from fedcare.models.builders import initial_parameters

        return initial_parameters(study.model, study.feature_schema.input_shape, study.seed)
    done = subprocess.run(
        [sys.executable, "-m", "fedcare.models.initial"],
        input=study.model_dump_json(by_alias=True).encode(),
        capture_output=True,
        timeout=_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise InitialModelError(f"cannot build the initial model: {reason[0]}")
    params = np.frombuffer(done.stdout, dtype="<f4").astype(np.float32)
    expected = study_parameter_count(study)
    if params.shape != (expected,):
        raise InitialModelError(f"the initial model has {params.size} values, not {expected}")
    return params


def _main() -> None:
    from fedcare.models.builders import initial_parameters

    study = Study.model_validate_json(sys.stdin.buffer.read())
    params = initial_parameters(study.model, study.feature_schema.input_shape, study.seed)
    sys.stdout.buffer.write(params.astype("<f4").tobytes())


if __name__ == "__main__":
    _main()
