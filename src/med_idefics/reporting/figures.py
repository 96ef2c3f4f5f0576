"""The report's two figures from the evaluation scores: Figure 2 (every metric by variant and suite) and Figure 3 (the
vqa-rad scores against the stage-1 training size: 0 = single-stage, the sweep points ``two-stage-n<N>``, the full
stage-1 set = two-stage), with Figure 3's data also as a CSV that DVC declares as a plot. Matplotlib is imported
inside functions (:mod:`med_idefics.reporting.plots`)."""

from __future__ import annotations

import csv
import io
import re

from med_idefics.config import Params
from med_idefics.data.suites import MED_HALT, SUITES, VQA_RAD
from med_idefics.reporting.results import (
    MED_HALT_LABELS,
    METRIC_LABELS,
    MISSING,
    VARIANTS,
    fmt_metric,
    markdown_table,
    ordered,
)

SWEEP = re.compile(r"two-stage-n(\d+)")  # med_idefics.stages.train.variant_name("stage2", n): the Figure-3 sweep points
SWEEP_SUITE = VQA_RAD
SWEEP_METRICS = ("closed_accuracy", "exact_match")
FIGURE3_TITLE = f"Figure 3: {SWEEP_SUITE} vs stage-1 training size"


def sweep_size(variant: str) -> int | None:
    match = SWEEP.fullmatch(variant)
    return int(match.group(1)) if match else None


def sweep_points(scores: dict) -> dict[int, dict]:
    return dict(sorted((n, s) for (v, suite), s in scores.items() if suite == SWEEP_SUITE and (n := sweep_size(v))))


def full_stage1_size(params: Params) -> int | None:
    """How many captions two-stage's stage 1 trained on: ``data.captions.train_size``, or the whole split's size."""
    captions = params.data.captions
    if captions.train_size is not None:
        return captions.train_size
    from med_idefics.data.schema import DatasetError, count_records

    try:
        return count_records(params.data.root, captions.dataset, captions.train_split)
    except DatasetError:  # the data is not here (a report on copied metrics): two-stage has no place on the curve
        return None


def figure3_series(scores: dict, params: Params) -> dict[int, tuple[str, dict]]:
    """Figure 3's curve, stage-1 size → (variant, its vqa-rad summary): 0 = single-stage (no stage 1), the sweep
    points, and the full stage-1 set = two-stage; each only where it was evaluated."""
    points = {n: (f"two-stage-n{n}", summary) for n, summary in sweep_points(scores).items()}
    if (single := scores.get(("single-stage", SWEEP_SUITE))) is not None:
        points[0] = ("single-stage", single)
    if (two_stage := scores.get(("two-stage", SWEEP_SUITE))) is not None and (full := full_stage1_size(params)):
        points[full] = ("two-stage", two_stage)
    return dict(sorted(points.items()))


def figure3_points(scores: dict, params: Params) -> dict[int, dict]:
    """:func:`figure3_series` without the variant names: stage-1 size → the vqa-rad summary."""
    return {n: summary for n, (_, summary) in figure3_series(scores, params).items()}


def figure3_csv(points: dict[int, tuple[str, dict]]) -> str:
    """Figure 3's data, one row per point (n = the stage-1 size): what `dvc plots show` draws."""
    buffer = io.StringIO()
    columns = [f"{m}{end}" for m in SWEEP_METRICS for end in ("", "_ci_low", "_ci_high")]
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["n", "variant", "questions", *columns])
    for n, (variant, summary) in points.items():
        writer.writerow([n, variant, summary.get("n", ""), *(_cell(summary.get(column)) for column in columns)])
    return buffer.getvalue()


def _cell(value) -> str:
    return "" if value is None else f"{value:.6g}"


def sweep_table(points: dict[int, tuple[str, dict]]) -> list[str]:
    if not points:
        return [f"{MISSING} no sweep points (no metrics/two-stage-n<N>/{SWEEP_SUITE}.json)."]
    rows = [
        [f"{n:,}", variant, str(summary.get("n", MISSING)), *(fmt_metric(summary, m) for m in SWEEP_METRICS)]
        for n, (variant, summary) in points.items()
    ]
    header = ["Stage-1 examples", "Variant", "n", *(f"{METRIC_LABELS[m]} ({SWEEP_SUITE})" for m in SWEEP_METRICS)]
    note = "0 = single-stage (no stage 1); the largest size = two-stage (the full stage-1 set)."
    return [note, "", *markdown_table(header, rows)]


def suite_n(scores: dict, suite: str) -> str:
    """``n = 450: 240 closed, 210 open`` (med-halt: ``n = 20``), from the suite's scores (the same questions for every
    variant; a range if they differ)."""
    summaries = [s for (_, name), s in scores.items() if name == suite]

    def spread(key: str) -> str:
        values = sorted({s[key] for s in summaries if isinstance(s.get(key), int)})
        return MISSING if not values else str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"

    if suite == MED_HALT:
        return f"n = {spread('n')}"
    return f"n = {spread('n')}: {spread('n_closed')} closed, {spread('n_open')} open"


def _estimate(summary: dict | None, name: str):
    from med_idefics.reporting.plots import Estimate

    summary = summary or {}
    return Estimate(summary.get(name), summary.get(f"{name}_ci_low"), summary.get(f"{name}_ci_high"))


def figure2(scores: dict, variants: list[str]):
    """Grouped bars: a panel per suite (titled with its n), a group per metric, a bar per variant."""
    from med_idefics.reporting import plots

    panels = {}
    for suite in (s for s in ordered({s for _, s in scores}, SUITES) if any(name == s for _, name in scores)):
        labels = MED_HALT_LABELS if suite == MED_HALT else METRIC_LABELS
        panels[f"{suite} ({suite_n(scores, suite)})"] = {
            label: {v: _estimate(scores.get((v, suite)), name) for v in variants} for name, label in labels.items()
        }
    return plots.grouped_bars(panels, "Figure 2: metrics by variant (95 % bootstrap intervals)")


def figure3(points: dict[int, tuple[str, dict]]):
    """The figure object (tests inspect what it draws); :func:`med_idefics.reporting.plots.to_png` renders it."""
    from med_idefics.reporting import plots

    lines = {METRIC_LABELS[m]: [(n, _estimate(s, m)) for n, (_, s) in points.items()] for m in SWEEP_METRICS}
    named = {n: f"{n:,}\n{variant}" for n, (variant, _) in points.items() if sweep_size(variant) is None}
    questions = {s.get("n") for _, s in points.values()}
    n = f", n = {questions.pop()} questions" if len(questions) == 1 else ""
    return plots.curves_figure(
        lines,
        f"{FIGURE3_TITLE}{n}",
        "stage-1 training examples (n; 0 = single-stage, the largest = two-stage)",
        "score",
        empty_message="no sweep points yet:\nevaluate the two-stage-n<N> variants (params `sweep`)",
        x_labels=named,
    )


def paper_variants(scores: dict) -> list[str]:
    """The evaluated variants that are not sweep points, the paper's first."""
    return ordered({v for v, _ in scores if sweep_size(v) is None}, VARIANTS)
