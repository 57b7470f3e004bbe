"""Pure helpers of the benchmark suite: medians, ratios, goals and the BENCHMARKS.md table."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def median(values: Sequence[float]) -> float:
    """Median of the finite values; NaN when there are none (a failed measurement)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def ratio(numerator: float, denominator: float) -> float:
    """`numerator / denominator`; NaN when either is missing or the denominator is not > 0."""
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator <= 0:
        return math.nan
    return numerator / denominator


@dataclass(frozen=True)
class Figure:
    """One benchmark figure and its goal: `measured <= goal` (or `>=` when `higher_is_better`)."""

    key: str
    title: str
    measured: float
    goal: float
    unit: str = ""
    higher_is_better: bool = False
    how: str = ""

    @property
    def passed(self) -> bool | None:
        """True or False against the goal; None when nothing was measured."""
        if not math.isfinite(self.measured):
            return None
        if self.higher_is_better:
            return self.measured >= self.goal
        return self.measured <= self.goal

    @property
    def verdict(self) -> str:
        """'pass', 'FAIL' or 'not measured'."""
        return {True: "pass", False: "FAIL", None: "not measured"}[self.passed]

    def goal_text(self) -> str:
        """The goal as '<= 1.15' or '>= 0.97 GiB'."""
        sign = ">=" if self.higher_is_better else "<="
        return f"{sign} {self.goal:g}{(' ' + self.unit) if self.unit else ''}"

    def measured_text(self) -> str:
        """The measured value with its unit; '–' when not measured."""
        if not math.isfinite(self.measured):
            return "–"
        digits = 3 if abs(self.measured) < 100 else 1
        return f"{self.measured:.{digits}f}{(' ' + self.unit) if self.unit else ''}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(figures: Sequence[Figure]) -> str:
    """A Markdown table: figure, measured, goal, pass/fail, how it was measured."""
    lines = [
        "| figure | measured | goal | result | how it was measured |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for f in figures:
        lines.append(
            f"| {_cell(f.title)} (`{f.key}`) | {f.measured_text()} | {_cell(f.goal_text())} | "
            f"{f.verdict} | {_cell(f.how)} |"
        )
    return "\n".join(lines)


def render_markdown(
    figures: Sequence[Figure],
    machine: Mapping[str, Any],
    *,
    mode: str,
    notes: Sequence[str] = (),
    command: str = "make bench",
) -> str:
    """The whole BENCHMARKS.md document."""
    machine_lines = [f"- {_cell(str(k))}: {_cell(str(v))}" for k, v in machine.items()]
    parts = [
        "# Benchmarks",
        "",
        f"Written by `{command}` (mode: **{mode}**); `BENCH=full make bench` runs the long "
        "version. Every ratio is measured within one run of the suite, on the machine below; "
        "timings are medians of repeats. Raw timings are in `bench/results.json`.",
        "",
        render_table(figures),
        "",
        "## Machine",
        "",
        *machine_lines,
    ]
    if notes:
        parts += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(parts) + "\n"
