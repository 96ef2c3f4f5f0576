"""Stage: the results report — the paper's Figure-2 table with 95 % intervals, the paired tests behind its claims,
the Figure-2 bars and the Figure-3 stage-1-size sweep — written to ``reports/`` and logged as the MLflow run ``report``.

Reads what the evaluation stage writes: ``metrics/<variant>/<suite>.json`` (:func:`med_idefics.metrics.summarize`
plus variant, suite, eval_run_id) and ``outputs/predictions/<variant>/<suite>.jsonl``; human grades from
``metrics/<variant>/<suite>-human.json`` (:mod:`med_idefics.review`). What has not been evaluated shows as "—".
Heavy libraries (scipy, matplotlib, mlflow) are imported inside functions: the CLI imports this module's error class
on every start.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from med_idefics.config import Params
from med_idefics.data.splits import split_name
from med_idefics.data.suites import EXPERT_PROMPT, MED_HALT, PATH_VQA, SUITES, SWAP, VQA_RAD
from med_idefics.files import write_atomic

METRICS_DIR = "metrics"
PREDICTIONS_DIR = "outputs/predictions"
REPORT_FILE = "reports/results.md"
FIGURE2_FILE, FIGURE3_FILE = "figure2.png", "figure3.png"  # beside the report
HUMAN_SUFFIX = "-human"  # metrics/<variant>/<suite>-human.json: human grades (med_idefics.review)

VARIANTS = ("base", "single-stage", "two-stage")  # always shown, "—" when not evaluated
SWEEP = re.compile(r"two-stage-n(\d+)")  # med_idefics.train.variant_name("stage2", n): the Figure-3 sweep points
SWEEP_SUITE = VQA_RAD
METRIC_LABELS = {
    "exact_match": "EM",
    "f1": "F1",
    "bleu": "BLEU",
    "closed_accuracy": "Closed acc.",
    "open_recall": "Open recall",
}
MED_HALT_LABELS = {"abstention_rate": "Abstention rate", "hallucination_rate": "Hallucination rate"}
SWEEP_METRICS = ("closed_accuracy", "exact_match")
MISSING = "—"


class ReportError(ValueError):
    """Nothing to report on, or an evaluation output is unreadable; the message names the file and what to do."""


@dataclass(frozen=True)
class Claim:
    """A paired test: ``b`` against the reference ``a``, each a (variant, suite), on the same questions."""

    title: str
    a: tuple[str, str]
    b: tuple[str, str]
    expected: str  # the paper's claim, in words


CLAIMS = (
    Claim("Two-stage vs single-stage", ("single-stage", VQA_RAD), ("two-stage", VQA_RAD), "two-stage is better"),
    Claim("Two-stage vs base", ("base", VQA_RAD), ("two-stage", VQA_RAD), "two-stage is better"),
    Claim("Two-stage vs base, out of domain", ("base", PATH_VQA), ("two-stage", PATH_VQA), "two-stage is better"),
    Claim("Swapped image vs plain (two-stage)", ("two-stage", VQA_RAD), ("two-stage", SWAP), "swapping hurts"),
    Claim("Expert vs plain (two-stage)", ("two-stage", VQA_RAD), ("two-stage", EXPERT_PROMPT), "expert helps"),
)


def metrics_path(metrics_dir: str | Path, variant: str, suite: str, human: bool = False) -> Path:
    return Path(metrics_dir) / variant / f"{suite}{HUMAN_SUFFIX if human else ''}.json"


def predictions_path(predictions_dir: str | Path, variant: str, suite: str) -> Path:
    return Path(predictions_dir) / variant / f"{suite}.jsonl"


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path}: unreadable ({err}); re-run the evaluation that writes it") from err
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}; re-run its evaluation")
    return data


def load_metrics(metrics_dir: str | Path) -> tuple[dict[tuple[str, str], dict], dict[tuple[str, str], dict]]:
    """(variant, suite) → the evaluation's metrics JSON, and → the human-grading JSON; an error when there are none."""
    scores: dict[tuple[str, str], dict] = {}
    human: dict[tuple[str, str], dict] = {}
    for path in sorted(Path(metrics_dir).glob("*/*.json")):
        variant, name = path.parent.name, path.stem
        if name.endswith(HUMAN_SUFFIX):
            human[variant, name.removesuffix(HUMAN_SUFFIX)] = read_json(path)
        else:
            scores[variant, name] = read_json(path)
    if not scores:
        raise ReportError(
            f"no evaluation metrics under {metrics_dir}/ (expected <variant>/<suite>.json): "
            "run the evaluations first (`dvc repro`), then the report"
        )
    return scores, human


def sweep_size(variant: str) -> int | None:
    match = SWEEP.fullmatch(variant)
    return int(match.group(1)) if match else None


def ordered(found: set[str], canonical: tuple[str, ...]) -> list[str]:
    """The canonical names first (always), then any others found, sorted."""
    return [*canonical, *sorted(found - set(canonical))]


def fmt(value: float | None, low: float | None = None, high: float | None = None) -> str:
    """``0.557 [0.51, 0.60]``; ``—`` for a value that does not exist."""
    if value is None:
        return MISSING
    return f"{value:.3f}" if low is None or high is None else f"{value:.3f} [{low:.2f}, {high:.2f}]"


def fmt_metric(summary: dict | None, name: str) -> str:
    if not summary:
        return MISSING
    return fmt(summary.get(name), summary.get(f"{name}_ci_low"), summary.get(f"{name}_ci_high"))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def results_tables(scores: dict[tuple[str, str], dict], variants: list[str], suites: list[str]) -> list[str]:
    rows = []
    for suite in (s for s in suites if s != MED_HALT):
        for variant in variants:
            summary = scores.get((variant, suite))
            n = str(summary["n"]) if summary and "n" in summary else MISSING
            rows.append([suite, variant, n, *(fmt_metric(summary, name) for name in METRIC_LABELS)])
    lines = _table(["Suite", "Variant", "n", *METRIC_LABELS.values()], rows)
    if MED_HALT in suites:
        halt = [
            [variant, str(scores.get((variant, MED_HALT), {}).get("n", MISSING))]
            + [fmt_metric(scores.get((variant, MED_HALT)), name) for name in MED_HALT_LABELS]
            for variant in variants
        ]
        lines += ["", "Med-HALT nonsense questions (lower hallucination is better):", ""]
        lines += _table(["Variant", "n", *MED_HALT_LABELS.values()], halt)
    return lines


def paired_tests(params: Params, predictions_dir: str | Path) -> list[tuple[Claim, dict | str]]:
    """Each claim with :func:`med_idefics.metrics.compare`'s result (scored as the evaluation scored: the paper's
    way), or why it could not be tested."""
    from med_idefics.metrics import PAPER, compare
    from med_idefics.predictions import PredictionsError, read_predictions

    results: list[tuple[Claim, dict | str]] = []
    for claim in CLAIMS:
        paths = [predictions_path(predictions_dir, *side) for side in (claim.a, claim.b)]
        absent = [str(path) for path in paths if not path.is_file()]
        if absent:
            results.append((claim, f"not evaluated: {', '.join(absent)} missing"))
            continue
        try:
            rows_a, rows_b = (read_predictions(path) for path in paths)
            results.append((claim, compare(rows_a, rows_b, params.eval.seed, params.eval.bootstrap_resamples, PAPER)))
        except PredictionsError as err:
            results.append((claim, f"not comparable: {err}"))
    return results


def paired_sections(tests: list[tuple[Claim, dict | str]]) -> list[str]:
    lines: list[str] = []
    for claim, result in tests:
        (va, sa), (vb, sb) = claim.a, claim.b
        lines += ["", f"### {claim.title}", "", f"B = {vb} on {sb}, A = {va} on {sa}; the paper: {claim.expected}."]
        if isinstance(result, str):
            lines += ["", f"{MISSING} {result}"]
            continue
        rows = []
        for name, label in METRIC_LABELS.items():
            entry = result[name]
            p_value = MISSING if entry.get("p_value") is None else f"{entry['p_value']:.3g}"
            significant = {True: "**yes**", False: "no", None: MISSING}[entry["significant"]]
            diff = _signed(entry["diff"], entry["ci_low"], entry["ci_high"])
            rows.append([label, fmt(entry["a"]), fmt(entry["b"]), diff, p_value, significant])
        lines += ["", f"n = {result['n']} paired questions ({result['n_closed']} closed, {result['n_open']} open).", ""]
        lines += _table(["Metric", "A", "B", "B − A [95% CI]", "McNemar p", "Significant (0.05)"], rows)
    return lines


def _signed(diff: float | None, low: float | None, high: float | None) -> str:
    if diff is None:
        return MISSING
    return f"{diff:+.3f}" if low is None else f"{diff:+.3f} [{low:+.2f}, {high:+.2f}]"


def sweep_points(scores: dict) -> dict[int, dict]:
    return dict(sorted((n, s) for (v, suite), s in scores.items() if suite == SWEEP_SUITE and (n := sweep_size(v))))


def sweep_and_human(scores: dict, human: dict, figure: str) -> list[str]:
    points = sweep_points(scores)
    lines = ["", "## Stage-1 training size sweep (Figure 3)", ""]
    if points:
        rows = [[f"{n:,}", *(fmt_metric(s, name) for name in SWEEP_METRICS)] for n, s in points.items()]
        lines += _table(["Stage-1 examples", *(METRIC_LABELS[m] + f" ({SWEEP_SUITE})" for m in SWEEP_METRICS)], rows)
    else:
        lines.append(f"{MISSING} no sweep points (no metrics/two-stage-n<N>/{SWEEP_SUITE}.json).")
    lines += ["", f"![Figure 3]({figure})", "", "## Human evaluation", ""]
    if human:
        rows = [
            [variant, suite, f"{h.get('n_right', MISSING)}/{h.get('n', MISSING)}", fmt_metric(h, "human_accuracy")]
            for (variant, suite), h in sorted(human.items())
        ]
        lines += _table(["Variant", "Suite", "Right", "Human accuracy"], rows)
    else:
        lines.append(f"{MISSING} none imported yet (`med-idefics review export`, grade, `med-idefics review import`).")
    return lines


def render_markdown(params: Params, scores: dict, human: dict, tests: list, figures: tuple[str, str]) -> str:
    variants = ordered({v for v, _ in scores if sweep_size(v) is None}, VARIANTS)
    suites = ordered({s for _, s in scores}, SUITES)
    lines = [
        "# Results",
        "",
        f"Profile `{params.profile}`. Each value is a mean with its 95 % percentile-bootstrap interval "
        f"({params.eval.bootstrap_resamples} resamples, seed {params.eval.seed}); {MISSING} = not evaluated. "
        f"VQA split: {split_name(params.data.vqa)} (`data.vqa.split`).",
        "",
        "## Figure 2: variants × suites",
        "",
        *results_tables(scores, variants, suites),
        "",
        f"![Figure 2]({figures[0]})",
        "",
        "## Paired tests of the paper's claims",
        "",
        "Same questions, matched by id. Significant at 0.05: the exact McNemar test for EM and closed accuracy, "
        "a paired-bootstrap interval excluding 0 for the others.",
        *paired_sections(tests),
        *sweep_and_human(scores, human, figures[1]),
        "",
    ]
    return "\n".join(lines)


def _estimate(summary: dict | None, name: str):
    from med_idefics.plots import Estimate

    summary = summary or {}
    return Estimate(summary.get(name), summary.get(f"{name}_ci_low"), summary.get(f"{name}_ci_high"))


def render_figures(scores: dict) -> tuple[bytes, bytes]:
    from med_idefics import plots

    variants = ordered({v for v, _ in scores if sweep_size(v) is None}, VARIANTS)
    panels = {}
    for suite in ordered({s for _, s in scores}, SUITES):
        labels = MED_HALT_LABELS if suite == MED_HALT else METRIC_LABELS
        panels[suite] = {
            label: {v: _estimate(scores.get((v, suite)), name) for v in variants} for name, label in labels.items()
        }
    figure2 = plots.grouped_bars(panels, "Figure 2: metrics by variant (95 % bootstrap intervals)")
    points = sweep_points(scores)
    lines = {METRIC_LABELS[m]: [(n, _estimate(s, m)) for n, s in points.items()] for m in SWEEP_METRICS}
    references = {
        METRIC_LABELS[m]: {v: _estimate(scores.get((v, SWEEP_SUITE)), m) for v in ("single-stage", "two-stage")}
        for m in SWEEP_METRICS
    }
    figure3 = plots.curves(
        lines,
        f"Figure 3: {SWEEP_SUITE} vs stage-1 training size",
        "stage-1 training examples (n)",
        "score",
        references=references,
        empty_message="no sweep points yet:\nevaluate the two-stage-n<N> variants (params `sweep`)",
    )
    return figure2, figure3


def build_report(
    params: Params,
    metrics_dir: str | Path = METRICS_DIR,
    predictions_dir: str | Path = PREDICTIONS_DIR,
    out: str | Path = REPORT_FILE,
    dvc_stage: str | None = None,
) -> dict[str, Path]:
    """Write the report and its two figures, log them as the MLflow run ``report``; return the written paths."""
    import mlflow

    from med_idefics.tracking import tracked_run

    scores, human = load_metrics(metrics_dir)
    out = Path(out)
    tests = paired_tests(params, predictions_dir)
    figure2, figure3 = render_figures(scores)
    written = {
        "figure2": write_atomic(out.parent / FIGURE2_FILE, figure2),
        "figure3": write_atomic(out.parent / FIGURE3_FILE, figure3),
    }
    written["report"] = write_atomic(out, render_markdown(params, scores, human, tests, (FIGURE2_FILE, FIGURE3_FILE)))
    with tracked_run(params, "report", dvc_stage=dvc_stage) as run:
        if run is not None:
            for path in written.values():
                mlflow.log_artifact(str(path))
            mlflow.log_metrics(
                {
                    f"{suite}/{variant}/{name}": summary[name]
                    for (variant, suite), summary in scores.items()
                    for name in (*METRIC_LABELS, *MED_HALT_LABELS)
                    if isinstance(summary.get(name), int | float)
                }
            )
    return written
