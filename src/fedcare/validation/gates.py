"""Release gates: pure checks of a :class:`ValidationReport` against a site's thresholds.

Four kinds of gate:

* ``overall``: a metric on all patients, e.g. AUROC >= 0.80 or ECE <= 0.05.
* ``every_subgroup``: a metric in every subgroup cell (of one attribute, or of
  all) that has at least ``min_positives`` positives, e.g. sensitivity >= 0.85.
* ``subgroup_gap``: the largest difference of a metric between levels of one
  attribute, e.g. the sensitivity gap across ethnicity <= 0.10.
* ``no_drop``: the overall metric has not worsened by more than ``tolerance``
  against a previous report, e.g. AUROC drop <= 0.02.

What cannot be checked:

* Suppressed cells (below the site's minimum cohort) carry no numbers, so
  subgroup gates skip them and add an informational note; that is the site's
  disclosure rule working, not a failed model. A suppressed *overall* cell
  fails any gate that needs it, since nothing about the model was shown.
* A metric that is undefined in a cell that is checked (AUROC with one class,
  PPV with no predicted positives) fails the gate: a release has to show that
  it meets the threshold, and it has not.
* A ``no_drop`` gate with no previous report, or a previous report whose value
  is suppressed or undefined, passes with a note: there is nothing to drop from.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from fedcare.validation.cells import CellReport, SuppressedCell, ValidationReport
from fedcare.validation_spec import (
    HIGHER_IS_BETTER,
    IDEAL,
    LOWER_IS_BETTER,
    GateKind,
    GateSpec,
    Metric,
)


class Verdict(BaseModel):
    """The outcome of every gate for one site's report.

    ``reasons`` are the failures, one sentence each; ``notes`` say what could
    not be checked and why, and never make the verdict fail.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str
    passed: bool
    reasons: list[str]
    notes: list[str]


def _fmt(value: float) -> str:
    # Three decimals without trailing zeros: "0.71", "0.849", "0.1".
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _meets(value: float, op: str, threshold: float) -> bool:
    return value >= threshold if op == ">=" else value <= threshold


def _side(op: str) -> str:
    return "below" if op == ">=" else "above"


def _value(cell: CellReport, metric: Metric) -> float | None:
    return cell.estimate(metric).value


def _check_overall(gate: GateSpec, report: ValidationReport, site: str) -> list[str]:
    # Both guaranteed by GateSpec for this kind.
    assert gate.op is not None
    assert gate.threshold is not None
    cell = report.overall
    metric = gate.metric.value
    if isinstance(cell, SuppressedCell):
        return [f"site {site}: {metric} cannot be checked, all patients are below the minimum"]
    value = _value(cell, gate.metric)
    if value is None:
        return [
            f"site {site}: {metric} is undefined on all patients, so not {gate.op} "
            f"{_fmt(gate.threshold)}"
        ]
    if _meets(value, gate.op, gate.threshold):
        return []
    return [f"site {site}: {metric} {_fmt(value)} is {_side(gate.op)} {_fmt(gate.threshold)}"]


def _cells(
    report: ValidationReport, attribute: str | None
) -> list[tuple[str, CellReport | SuppressedCell]]:
    if attribute is None:
        return [(name, cell) for name, cells in report.subgroups.items() for cell in cells]
    if attribute not in report.subgroups:
        return []
    return [(attribute, cell) for cell in report.subgroups[attribute]]


def _missing_attribute(gate: GateSpec, report: ValidationReport, site: str) -> list[str]:
    # A gate on an attribute the report does not break down by must not pass
    # silently: nothing in that attribute was checked.
    if gate.attribute is not None and gate.attribute not in report.subgroups:
        return [
            f"site {site}: {gate.metric.value} cannot be checked by {gate.attribute}, "
            "the report has no such subgroup"
        ]
    return []


def _suppressed_note(site: str, metric: Metric, cells: Sequence[SuppressedCell]) -> list[str]:
    if not cells:
        return []
    groups = ", ".join(cell.group for cell in cells)
    return [
        f"site {site}: {metric.value} not checked in {groups} "
        "(suppressed, below the minimum cohort size)"
    ]


def _check_every_subgroup(
    gate: GateSpec, report: ValidationReport, site: str
) -> tuple[list[str], list[str]]:
    # Both guaranteed by GateSpec for this kind.
    assert gate.op is not None
    assert gate.threshold is not None
    reasons = _missing_attribute(gate, report, site)
    suppressed: list[SuppressedCell] = []
    few: list[str] = []
    metric = gate.metric.value
    for _, cell in _cells(report, gate.attribute):
        if isinstance(cell, SuppressedCell):
            suppressed.append(cell)
            continue
        if cell.positives < gate.min_positives:
            few.append(cell.group)
            continue
        value = _value(cell, gate.metric)
        if value is None:
            reasons.append(
                f"site {site}: {metric} is undefined in {cell.group}, so not "
                f"{gate.op} {_fmt(gate.threshold)}"
            )
        elif not _meets(value, gate.op, gate.threshold):
            reasons.append(
                f"site {site}: {metric} {_fmt(value)} in {cell.group} is "
                f"{_side(gate.op)} {_fmt(gate.threshold)}"
            )
    notes = _suppressed_note(site, gate.metric, suppressed)
    if few:
        notes.append(
            f"site {site}: {metric} not checked in {', '.join(few)} "
            f"(fewer than {gate.min_positives} positives)"
        )
    return reasons, notes


def _check_gap(gate: GateSpec, report: ValidationReport, site: str) -> tuple[list[str], list[str]]:
    # Both guaranteed by GateSpec for this kind.
    assert gate.threshold is not None
    assert gate.attribute is not None
    reasons = _missing_attribute(gate, report, site)
    suppressed: list[SuppressedCell] = []
    measured: list[tuple[float, str]] = []
    metric = gate.metric.value
    for _, cell in _cells(report, gate.attribute):
        if isinstance(cell, SuppressedCell):
            suppressed.append(cell)
        elif cell.positives >= gate.min_positives:
            value = _value(cell, gate.metric)
            # An undefined value has no place on the scale; it cannot widen the gap.
            if value is not None:
                measured.append((value, cell.group))
    notes = _suppressed_note(site, gate.metric, suppressed)
    if len(measured) < 2:
        if not reasons:
            notes.append(
                f"site {site}: {metric} gap across {gate.attribute} not checked "
                "(fewer than two subgroups to compare)"
            )
        return reasons, notes
    low, high = min(measured), max(measured)
    gap = high[0] - low[0]
    if gap > gate.threshold:
        reasons.append(
            f"site {site}: {metric} gap across {gate.attribute} is {_fmt(gap)} "
            f"({_fmt(high[0])} in {high[1]} vs {_fmt(low[0])} in {low[1]}), "
            f"above {_fmt(gate.threshold)}"
        )
    return reasons, notes


def _worsening(metric: Metric, before: float, after: float) -> float:
    """How much worse ``after`` is than ``before``; negative when it improved."""
    if metric in HIGHER_IS_BETTER:
        return before - after
    if metric in LOWER_IS_BETTER:
        return after - before
    ideal = IDEAL[metric]
    return abs(after - ideal) - abs(before - ideal)


def _check_no_drop(
    gate: GateSpec, report: ValidationReport, previous: ValidationReport | None, site: str
) -> tuple[list[str], list[str]]:
    assert gate.tolerance is not None  # guaranteed by GateSpec
    metric = gate.metric.value
    before_cell = None if previous is None else previous.overall
    before = _value(before_cell, gate.metric) if isinstance(before_cell, CellReport) else None
    if before is None:
        return [], [f"site {site}: {metric} drop not checked (no previous value to compare)"]
    cell = report.overall
    after = _value(cell, gate.metric) if isinstance(cell, CellReport) else None
    if after is None:
        return [
            f"site {site}: {metric} drop cannot be checked, the new value is "
            "suppressed or undefined"
        ], []
    worse = _worsening(gate.metric, before, after)
    if worse > gate.tolerance:
        return [
            f"site {site}: {metric} worsened by {_fmt(worse)} (from {_fmt(before)} to "
            f"{_fmt(after)}), more than {_fmt(gate.tolerance)}"
        ], []
    return [], []


def evaluate_gates(
    report: ValidationReport,
    gates: Sequence[GateSpec],
    previous: ValidationReport | None = None,
    *,
    site: str,
) -> Verdict:
    """Check every gate; the verdict passes when no gate has a failure reason."""
    reasons: list[str] = []
    notes: list[str] = []
    for gate in gates:
        if gate.kind is GateKind.OVERALL:
            reasons += _check_overall(gate, report, site)
            continue
        if gate.kind is GateKind.EVERY_SUBGROUP:
            failed, noted = _check_every_subgroup(gate, report, site)
        elif gate.kind is GateKind.SUBGROUP_GAP:
            failed, noted = _check_gap(gate, report, site)
        else:
            failed, noted = _check_no_drop(gate, report, previous, site)
        reasons += failed
        notes += noted
    return Verdict(site=site, passed=not reasons, reasons=reasons, notes=notes)
