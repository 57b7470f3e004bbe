import math

import pytest

from bench.stats import Figure, median, ratio, render_markdown, render_table


def test_median_ignores_failed_measurements() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert median([1.0, math.nan, 5.0, math.inf]) == 3.0
    assert math.isnan(median([]))
    assert math.isnan(median([math.nan]))


@pytest.mark.parametrize(
    ("num", "den", "expected"),
    [(3.0, 2.0, 1.5), (0.0, 2.0, 0.0), (1.0, 0.0, math.nan), (1.0, -1.0, math.nan),
     (math.nan, 1.0, math.nan), (1.0, math.inf, math.nan)],
)
def test_ratio(num: float, den: float, expected: float) -> None:
    got = ratio(num, den)
    assert (math.isnan(got) and math.isnan(expected)) or got == expected


@pytest.mark.parametrize(
    ("measured", "goal", "higher", "passed", "verdict"),
    [(1.1, 1.15, False, True, "pass"), (1.15, 1.15, False, True, "pass"),
     (1.2, 1.15, False, False, "FAIL"), (0.98, 0.97, True, True, "pass"),
     (0.9, 0.97, True, False, "FAIL"), (math.nan, 1.0, False, None, "not measured")],
)
def test_figure_against_its_goal(measured, goal, higher, passed, verdict) -> None:
    figure = Figure("k", "t", measured, goal, higher_is_better=higher)
    assert figure.passed is passed
    assert figure.verdict == verdict


def test_figure_text() -> None:
    memory = Figure("scale_peak_rss_gib", "Peak memory", 2.3456, 4.0, unit="GiB")
    assert memory.goal_text() == "<= 4 GiB"
    assert memory.measured_text() == "2.346 GiB"
    assert Figure("q", "Q", 0.95, 0.97, higher_is_better=True).goal_text() == ">= 0.97"
    assert Figure("x", "X", math.nan, 1).measured_text() == "–"
    assert Figure("x", "X", 1234.5, 2000).measured_text() == "1234.5"


def test_table_has_one_row_per_figure_and_escapes_pipes() -> None:
    figures = [
        Figure("sim_overhead_ratio", "Simulation overhead", 1.3, 1.15, how="a | b"),
        Figure("bytes_ratio", "Bytes", 1.0, 1.05),
    ]
    lines = render_table(figures).splitlines()
    assert lines[0] == "| figure | measured | goal | result | how it was measured |"
    assert len(lines) == 2 + len(figures)
    assert lines[2].count(" | ") == 4  # the pipe inside `how` is escaped
    assert "a \\| b" in lines[2] and "| FAIL |" in lines[2]
    assert "| pass |" in lines[3]


def test_markdown_document() -> None:
    doc = render_markdown(
        [Figure("bytes_ratio", "Bytes", 1.0, 1.05)], {"cores": 2, "cpu": "x"}, mode="quick",
        notes=["noisy"],
    )
    assert doc.startswith("# Benchmarks\n")
    assert "mode: **quick**" in doc
    assert "- cores: 2" in doc and "## Notes" in doc and "- noisy" in doc
