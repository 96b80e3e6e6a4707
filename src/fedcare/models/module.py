"""A study's own PyTorch model (``model: {kind: module}``), installed by every party.

No code travels with a study. Each party installs the module the study names, and
the study carries the SHA-256 of the entrypoint module's source file, so a site's
approval of the study's hash covers that file. Before anything is imported the
installed file is hashed; a file that differs is refused, and its code never runs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fedcare.study import ModelSpec

if TYPE_CHECKING:
    from torch import nn

Builder = Callable[[tuple[int, ...]], "nn.Module"]


class ModelSourceError(ValueError):
    """A model module that is not installed here, or not the one the study approved."""


def module_source(entrypoint: str) -> Path:
    """The source file of the entrypoint's module, found without importing it."""
    name = entrypoint.partition(":")[0]
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        found = None
        reason = str(exc)
    else:
        reason = "not found"
    if found is None or found.origin is None or not Path(found.origin).is_file():
        raise ModelSourceError(
            f"model module '{name}' is not installed here ({reason}); each party installs "
            "the study's model, no code travels with the study"
        )
    return Path(found.origin)


def source_digest(entrypoint: str) -> str:
    """SHA-256 of the installed entrypoint module's source file (what source_sha256 names)."""
    return hashlib.sha256(module_source(entrypoint).read_bytes()).hexdigest()


def load_builder(spec: ModelSpec) -> Builder:
    """The entrypoint function, once its module's source matches the study's digest."""
    assert spec.entrypoint is not None
    assert spec.source_sha256 is not None
    name, _, attribute = spec.entrypoint.partition(":")
    source = module_source(spec.entrypoint)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if digest != spec.source_sha256:
        raise ModelSourceError(
            f"model module '{name}' installed here ({source}) has SHA-256 {digest}; the "
            f"study approved {spec.source_sha256}: install the version the study names"
        )
    module = importlib.import_module(name)
    if getattr(module, "__file__", None) != str(source):
        raise ModelSourceError(
            f"model module '{name}' was imported from {module.__file__}, not from the "
            f"checked file {source}"
        )
    builder = getattr(module, attribute, None)
    if not callable(builder):
        raise ModelSourceError(f"model module '{name}' has no function '{attribute}'")
    return builder  # type: ignore[no-any-return]  # checked callable; its contract is documented
