"""The report's per-site charts, written as SVG directly: valid, escaped, and placed right."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from fedcare import plots, svg_chart
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


@pytest.mark.parametrize(
    ("low", "high", "integer", "expected"),
    [
        (0.52, 0.68, False, [0.55, 0.6, 0.65]),
        (0.5, 50.5, True, [10, 20, 30, 40, 50]),
        (0.5, 3.5, True, [1, 2, 3]),
        (-1.0, 1.0, False, [-1.0, -0.5, 0.0, 0.5, 1.0]),
    ],
)
def test_ticks_between_any_two_values(
    low: float, high: float, integer: bool, expected: list[float]
) -> None:
    assert svg_chart.ticks(high, low, integer) == pytest.approx(expected)


def _texts(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text")]


def test_the_by_round_figure_leaves_gaps_draws_intervals_and_names_every_line() -> None:
    auroc = {
        "north": [(1, 0.70), (2, None), (3, 0.74), (4, 0.75)],
        "south": [(1, 0.60), (2, 0.62), (3, 0.64), (4, 0.66)],
    }
    intervals = {"south": [(2, 0.55, 0.69), (4, 0.58, 0.73)]}
    loss = {"mean training loss": [(1, 0.69), (2, 0.66), (3, 0.65), (4, 0.64)]}
    root = ET.fromstring(plots.by_round(auroc, loss, intervals=intervals, rounds=4))
    texts = _texts(root)
    assert {"north", "south", "mean training loss", "Round"} <= set(texts)
    assert {"1", "2", "3", "4"} <= set(texts)  # whole rounds on the x axis
    lines = root.findall("s:polyline", NS)
    # north's missing round splits its line in two; south and the loss are whole.
    assert [len(_points(line)) for line in lines] == [1, 2, 4, 4]
    bars = [p for p in root.findall("s:path", NS) if "stroke-opacity: 0.6" in p.attrib["style"]]
    assert len(bars) == 2
    # A bar spans its interval on the same scale as the line: the first bar (0.55 to 0.69)
    # brackets south's round-2 point (0.62) at its middle.
    (_, y_point) = _points(lines[2])[1]
    found = re.match(r"M[\d.]+ ([\d.]+)V([\d.]+)", bars[0].attrib["d"])
    assert found is not None
    low, high = float(found[1]), float(found[2])
    assert low > y_point > high
    assert (low + high) / 2 == pytest.approx(y_point, abs=0.1)


def test_many_lines_put_the_legend_beside_the_axes_not_over_them() -> None:
    few = ET.fromstring(plots.by_round({f"s{i}": [(1, 0.5), (2, 0.6)] for i in range(3)}))
    many = {f"site-{i:02d}": [(1, 0.5 + i / 100), (2, 0.6)] for i in range(24)}
    root = ET.fromstring(plots.by_round(many))
    assert set(many) <= set(_texts(root))
    assert float(root.attrib["width"].removesuffix("pt")) > float(
        few.attrib["width"].removesuffix("pt")
    )
    frame = next(r for r in root.findall("s:rect", NS) if "stroke: #000000" in r.attrib["style"])
    legend = next(r for r in root.findall("s:rect", NS) if "#cccccc" in r.attrib["style"])
    frame_right = float(frame.attrib["x"]) + float(frame.attrib["width"])
    assert float(legend.attrib["x"]) > frame_right
    bottom = float(legend.attrib["y"]) + float(legend.attrib["height"])
    assert bottom <= float(root.attrib["viewBox"].split()[3])  # the whole legend is shown


def test_a_legend_inside_the_axes_goes_to_the_corner_with_fewest_points() -> None:
    # High early, low late: points in the upper left and lower right corners only, so
    # the legend goes to the upper right.
    falling = {"falling": [(r, 0.9 if r <= 5 else 0.1) for r in range(1, 11)]}
    root = ET.fromstring(plots.by_round(falling, rounds=10))
    frame = next(r for r in root.findall("s:rect", NS) if "stroke: #000000" in r.attrib["style"])
    legend = next(r for r in root.findall("s:rect", NS) if "#cccccc" in r.attrib["style"])
    middle_x = float(frame.attrib["x"]) + float(frame.attrib["width"]) / 2
    middle_y = float(frame.attrib["y"]) + float(frame.attrib["height"]) / 2
    assert float(legend.attrib["y"]) < middle_y
    assert float(legend.attrib["x"]) > middle_x


def test_epsilon_by_round_draws_each_budget_dotted_without_a_legend_entry() -> None:
    svg = plots.epsilon_by_round({"north": [0.5, 1.0, 1.5]}, {"north": 2.0})
    root = ET.fromstring(svg)
    texts = _texts(root)
    assert "north" in texts
    assert "north budget" not in texts
    spent, budget = root.findall("s:polyline", NS)
    assert f"stroke-dasharray: {svg_chart.DOTTED}" in budget.attrib["style"]
    (_, y_budget), _ = _points(budget)
    assert all(y > y_budget for _, y in _points(spent))  # every value below the budget
