"""The report's per-site charts, written as SVG directly: valid, escaped, and placed right."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from fedcare import svg_chart
from fedcare.plots import roc_and_calibration
from fedcare.validation.curves import Curves

NS = {"s": "http://www.w3.org/2000/svg"}


@pytest.mark.parametrize(
    ("high", "expected"),
    [
        (1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (0.43, [0.0, 0.1, 0.2, 0.3, 0.4]),
        (0.11, [0.0, 0.05, 0.1]),
        (3.0, [0.0, 1.0, 2.0, 3.0]),
        (0.0, [0.0]),
    ],
)
def test_ticks_are_round_and_never_past_the_axis(high: float, expected: list[float]) -> None:
    assert svg_chart.ticks(high) == pytest.approx(expected)


def _points(line: ET.Element) -> list[tuple[float, float]]:
    pairs = (p.split(",") for p in line.attrib["points"].split())
    return [(float(x), float(y)) for x, y in pairs]


def test_a_chart_is_valid_svg_with_its_text_and_lines_in_place() -> None:
    curves = {
        "federated": Curves(fpr=[0, 0.5, 1], tpr=[0, 0.8, 1], predicted=[0.1], observed=[0.2]),
    }
    svg = roc_and_calibration('St <Mary> & "Co"', curves)
    root = ET.fromstring(svg)  # well-formed: the site's name is escaped
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert 'ROC at St <Mary> & "Co"' in texts
    assert {"False positive rate (1 - specificity)", "Observed event rate", "chance"} <= set(texts)
    roc_line, chance, calibration, diagonal = root.findall("s:polyline", NS)
    assert "stroke: #d62728" in roc_line.attrib["style"]  # the federated model's colour
    (x0, y0), (xm, ym), (x1, y1) = _points(roc_line)
    # (0, 0) at the bottom left, (1, 1) at the top right, (0.5, 0.8) between, in proportion.
    assert x0 < xm < x1
    assert y0 > ym > y1
    assert (xm - x0) / (x1 - x0) == pytest.approx(0.5, abs=0.01)
    assert (y0 - ym) / (y0 - y1) == pytest.approx(0.8, abs=0.01)
    assert _points(chance) == [(x0, y0), (x1, y1)]
    # The calibration panel is to the right, and its diagonal, past the axis range,
    # is clamped to the frame's top right corner rather than drawn outside it.
    assert min(x for x, _ in _points(calibration)) > x1
    frames = [r for r in root.findall("s:rect", NS) if "stroke: #000000" in r.attrib["style"]]
    right = frames[1]
    corner = (
        float(right.attrib["x"]) + float(right.attrib["width"]),
        float(right.attrib["y"]),
    )
    assert _points(diagonal)[-1] == pytest.approx(corner, abs=0.11)
