"""Strict YAML files read into pydantic models, with errors that name the field's path.

Studies, site policies and other hand-written files share one reading so that
every one of them reports a typo or a wrong type the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def format_validation_errors(exc: ValidationError, source: str, what: str) -> str:
    """One line per problem, each starting with the dotted path of the field."""
    lines = [f"{source}: the {what} does not validate:"]
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; unknown keys are never ignored)"
        lines.append(f"  {path}: {message}")
    return "\n".join(lines)


_FAST_LOADER = getattr(yaml, "CSafeLoader", None)
"""libyaml's safe loader when PyYAML was built with it: the same documents, parsed in C."""


def load_yaml(text: str) -> object:
    """``yaml.safe_load``, parsed by libyaml when it is there (a simulation reads a mapping
    file per site); an error is raised by PyYAML's own parser, whose messages quote the
    offending line."""
    if _FAST_LOADER is not None:
        try:
            return yaml.load(text, Loader=_FAST_LOADER)
        except yaml.YAMLError:
            pass
    return yaml.safe_load(text)


def read_yaml_model(path: Path, model: type[M], what: str, error: type[Exception]) -> M:
    """Read ``path`` and validate it as ``model``; an unreadable file raises ``error`` too."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        raise error(
            f"{path}: the {what} is not UTF-8 text (byte {exc.start} is 0x{byte:02x}); "
            "is this the right file?"
        ) from exc
    return parse_yaml_model(text, model, str(path), what, error)


def parse_yaml_model(
    text: str, model: type[M], source: str, what: str, error: type[Exception]
) -> M:
    """Parse ``text`` as a YAML mapping and validate it as ``model``; raise ``error`` if not."""
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise error(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{source}: a {what} is a mapping of settings, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(format_validation_errors(exc, source, what)) from exc
