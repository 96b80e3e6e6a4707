"""The file-format reference in ``docs/reference/``, generated from the pydantic models.

Each page lists every field of one file (type, default, meaning) from the model
that validates it, and ends with the complete commented example that ``fedcare
init`` writes. The test suite regenerates the pages and fails when the committed
ones differ, so the reference cannot drift from the code. Regenerate with::

    python -m fedcare.report.reference docs/reference
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from fedcare.data import template_text

JsonSchema = dict[str, Any]


@dataclass(frozen=True)
class Page:
    """One reference page: the file it documents and the model that reads it."""

    file: str
    model: type[BaseModel]
    source: str
    intro: str

    @property
    def template(self) -> str:
        """The complete example ``fedcare init`` writes for this file."""
        name = self.file.removesuffix(".yaml")
        return template_text(name)


def pages() -> list[Page]:
    """Every documented file, in the order a new user meets them."""
    from fedcare.config import CoordinatorConfig, SiteConfig
    from fedcare.policy.model import SitePolicy
    from fedcare.schema.mapping import SiteMapping
    from fedcare.simulation.sites import SitesFile
    from fedcare.sources.mapping import ExtractMapping
    from fedcare.study import Study

    return [
        Page(
            "study.yaml",
            Study,
            "src/fedcare/study.py",
            "The study: the contract every hospital signs. Validated strictly (an unknown key "
            "is an error) and identified by a content hash over every setting; a site runs "
            "a study only if its policy approves that exact hash.",
        ),
        Page(
            "mapping.yaml",
            SiteMapping,
            "src/fedcare/schema/mapping.py",
            "A site's mapping from its own columns, codes and units to the study's schema. "
            "Kept at the site and never sent. A column with `values` must hold only listed "
            "values: a raw value matches a key when its text is equal, or when both are numbers "
            "and equal (`1.0` matches `1`). Anything else is refused with the column, the raw "
            "values and their counts, or set to missing and counted where the study's feature "
            "says `on_invalid: missing`.",
        ),
        Page(
            "source-mapping.yaml",
            ExtractMapping,
            "src/fedcare/sources/mapping.py",
            "A site's mapping from its FHIR R4 bulk export or OMOP CDM 5.4 database to the "
            "study's schema (docs/sources.md). Kept at the site and never sent. Each row is one "
            "index encounter (visit); each feature is a patient field or the value its codes "
            "give within a window after the encounter starts, converted to the schema's unit. "
            "Codes the mapping does not name are counted and reported; a unit it does not "
            "list is refused.",
        ),
        Page(
            "sites.yaml",
            SitesFile,
            "src/fedcare/simulation/sites.py",
            "The sites of a simulation on one machine (`fedcare simulate --sites`, "
            "`fedcare calibrate --sites`). Paths are relative to the file.",
        ),
        Page(
            "policy.yaml",
            SitePolicy,
            "src/fedcare/policy/model.py",
            "A site's own rules, set by its privacy officer: jurisdiction, the smallest cohort "
            "behind a released number, the privacy budget per data set, its own release gates, "
            "and the studies it approved by hash. Kept at the site; never sent. "
            "`fedcare site approve` appends an approval and keeps the rest of the file as written.",
        ),
        Page(
            "site.yaml",
            SiteConfig,
            "src/fedcare/config.py",
            "A site agent's configuration (written by `fedcare provision` with placeholders). "
            "Relative paths are resolved against the file's folder.",
        ),
        Page(
            "coordinator.yaml",
            CoordinatorConfig,
            "src/fedcare/config.py",
            "The coordinator's configuration (written by `fedcare provision`). Relative paths "
            "are resolved against the file's folder.",
        ),
    ]


def _anchor(name: str) -> str:
    return name.lower()


def _type(schema: JsonSchema, defs: JsonSchema) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        target = defs[name]
        if "enum" in target:
            return _enum(target["enum"])
        return f"[{name}](#{_anchor(name)})"
    union = schema.get("anyOf") or schema.get("oneOf")
    if union:
        options = [s for s in union if s.get("type") != "null"]
        text = " or ".join(_type(s, defs) for s in options)
        nullable = len(options) < len(union)
        return f"{text} (optional)" if nullable else text
    if "enum" in schema:
        return _enum(schema["enum"])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    kind = schema.get("type")
    if kind == "array":
        if "prefixItems" in schema:
            return "[" + ", ".join(_type(s, defs) for s in schema["prefixItems"]) + "]"
        return f"list of {_type(schema.get('items', {}), defs)}"
    if kind == "object":
        values = schema.get("additionalProperties")
        if isinstance(values, dict):
            return f"map of text to {_type(values, defs)}"
        return "map"
    formats = {"path": "path", "uri": "URL", "date-time": "date-time with time zone"}
    if "format" in schema and schema["format"] in formats:
        return formats[schema["format"]]
    names = {"string": "text", "number": "number", "integer": "integer", "boolean": "true/false"}
    return names.get(str(kind), "any")


def _enum(values: list[Any]) -> str:
    return "one of " + ", ".join(f"`{v}`" for v in values)


def _constraints(schema: JsonSchema) -> str:
    parts = []
    for key, text in (
        ("minimum", ">="),
        ("exclusiveMinimum", ">"),
        ("maximum", "<="),
        ("exclusiveMaximum", "<"),
        ("minLength", "length >="),
        ("maxLength", "length <="),
        ("minItems", "items >="),
        ("pattern", "matches"),
    ):
        if key in schema:
            value = f"`{schema[key]}`" if key == "pattern" else schema[key]
            parts.append(f"{text} {value}")
    for option in schema.get("anyOf", []):
        parts.extend(_constraints(option).split("; ") if _constraints(option) else [])
    return "; ".join(parts)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _table(model: JsonSchema, defs: JsonSchema) -> list[str]:
    required = set(model.get("required", []))
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, prop in model.get("properties", {}).items():
        if name in required:
            default = "required"
        elif "default" in prop:
            default = f"`{json.dumps(prop['default'])}`"
        else:
            default = "empty"
        meaning = prop.get("description", "")
        if not meaning and "$ref" in prop:
            meaning = defs[prop["$ref"].rsplit("/", 1)[-1]].get("description", "")
        limits = _constraints(prop)
        if limits:
            meaning = f"{meaning} ({limits})" if meaning else limits
        rows.append(
            f"| `{name}` | {_cell(_type(prop, defs))} | {_cell(default)} | {_cell(meaning)} |"
        )
    return rows


def _reachable(schema: JsonSchema, defs: JsonSchema, seen: list[str]) -> list[str]:
    """Names of the object definitions ``schema`` refers to, depth first, each once."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str):
            name = ref.rsplit("/", 1)[-1]
            if name not in seen and "properties" in defs[name]:
                seen.append(name)
                _reachable(defs[name], defs, seen)
        for value in schema.values():
            _reachable(value, defs, seen)
    elif isinstance(schema, list):
        for value in schema:
            _reachable(value, defs, seen)
    return seen


def render(page: Page) -> str:
    """The markdown of one reference page."""
    schema = page.model.model_json_schema(by_alias=True)
    defs: JsonSchema = schema.get("$defs", {})
    lines = [
        f"# `{page.file}`",
        "",
        page.intro,
        "",
        f"<!-- Generated from {page.model.__name__} in {page.source} by "
        "`python -m fedcare.report.reference docs/reference`; do not edit by hand: "
        "tests/test_reference.py fails when this page and the code disagree. -->",
        "",
        f"`fedcare init {page.file.removesuffix('.yaml')}` writes the commented example at "
        "the end of this page.",
        "",
        "## Top level",
        "",
        *_table({k: v for k, v in schema.items() if k != "$defs"}, defs),
    ]
    for name in _reachable({k: v for k, v in schema.items() if k != "$defs"}, defs, []):
        definition = defs[name]
        lines += ["", f"## {name}", ""]
        if definition.get("description"):
            lines += [" ".join(definition["description"].split()), ""]
        lines += _table(definition, defs)
    lines += ["", "## A complete example", "", "```yaml", page.template.rstrip("\n"), "```", ""]
    return "\n".join(lines)


def index() -> str:
    """``docs/reference/README.md``: the list of pages."""
    lines = [
        "# File reference",
        "",
        "Every file fedcare reads, field by field, generated from the models that validate "
        "them. Start a file with `fedcare init KIND --out FILE`.",
        "",
    ]
    lines += [f"- [`{p.file}`]({p.file.removesuffix('.yaml')}.md)" for p in pages()]
    return "\n".join(lines) + "\n"


def generate() -> dict[str, str]:
    """File name to text for every page of ``docs/reference/``."""
    out = {f"{p.file.removesuffix('.yaml')}.md": render(p) for p in pages()}
    out["README.md"] = index()
    return out


def main(argv: list[str]) -> int:
    """Write the reference pages into the folder given as the only argument."""
    if len(argv) != 1:
        print("usage: python -m fedcare.report.reference DOCS_REFERENCE_DIR", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in generate().items():
        (folder / name).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
