"""Stage: the results report — the paper's Figure-2 table with 95 % intervals, the paired tests behind its claims,
the Figure-2 bars and the Figure-3 stage-1-size sweep — written to ``reports/`` and logged as the MLflow run ``report``.

Reads what the evaluation stage writes (:mod:`med_idefics.results`): ``metrics/<variant>/<suite>.json``
(:func:`med_idefics.metrics.summarize`) and ``outputs/predictions/<variant>/<suite>.jsonl``; human grades from
``metrics/<variant>/<suite>-human.json`` (:mod:`med_idefics.review`). What has not been evaluated shows as "—".
The ``report`` run holds the files (the Markdown, the figures, the paired tests as ``paired_tests.json``) and a few
counts; the numbers of each variant live on its own run (``<suite>/<metric>``, :mod:`med_idefics.evaluate`).
Heavy libraries (scipy, matplotlib, mlflow) are imported inside functions.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from med_idefics.config import Params, precision_label
from med_idefics.data.splits import split_name
from med_idefics.data.suites import EXPERT_PROMPT, MED_HALT, PATH_VQA, SUITES, SWAP, VALIDATION, VQA_RAD
from med_idefics.files import write_atomic, write_json
from med_idefics.results import (
    MED_HALT_LABELS,
    METRIC_LABELS,
    METRICS_DIR,
    MISSING,
    PREDICTIONS_DIR,
    VARIANTS,
    fmt,
    fmt_metric,
    load_scores,
    ordered,
    predictions_path,
)

REPORT_FILE = "reports/results.md"
FIGURE2_FILE, FIGURE3_FILE = "figure2.png", "figure3.png"  # beside the report
PAIRED_TESTS_FILE = "paired_tests.json"  # beside the report: the paired tests' numbers

SWEEP = re.compile(r"two-stage-n(\d+)")  # med_idefics.train.variant_name("stage2", n): the Figure-3 sweep points
SWEEP_SUITE = VQA_RAD
SWEEP_METRICS = ("closed_accuracy", "exact_match")


@dataclass(frozen=True)
class Claim:
    """A paired test: ``b`` against the reference ``a``, each a (variant, suite), on the same questions."""

    title: str
    a: tuple[str, str]
    b: tuple[str, str]
    expected: str  # the paper's claim, in words
    sign: int = 1  # the sign of b − a that the claim predicts


CLAIMS = (
    Claim("Two-stage vs single-stage", ("single-stage", VQA_RAD), ("two-stage", VQA_RAD), "two-stage is better"),
    Claim("Two-stage vs base", ("base", VQA_RAD), ("two-stage", VQA_RAD), "two-stage is better"),
    Claim("Two-stage vs base, out of domain", ("base", PATH_VQA), ("two-stage", PATH_VQA), "two-stage is better"),
    Claim("Swapped image vs plain (two-stage)", ("two-stage", VQA_RAD), ("two-stage", SWAP), "swapping hurts", -1),
    Claim("Expert vs plain (two-stage)", ("two-stage", VQA_RAD), ("two-stage", EXPERT_PROMPT), "expert helps"),
)


def sweep_size(variant: str) -> int | None:
    match = SWEEP.fullmatch(variant)
    return int(match.group(1)) if match else None


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


def claim_verdicts(tests: list[tuple[Claim, dict | str]]) -> list[str]:
    """One sentence per claim: reproduced (the paired exact-match difference has the claimed sign and McNemar's
    p < 0.05), or not, with the figures."""
    lines = []
    for claim, result in tests:
        if isinstance(result, str):
            lines.append(f"- **Not tested** — {claim.title}: {result}.")
            continue
        em, closed = result["exact_match"], result["closed_accuracy"]
        reproduced = em["diff"] is not None and em["diff"] * claim.sign > 0 and bool(em["significant"])
        verdict = "Reproduced" if reproduced else "Not reproduced"
        figures = (
            f"exact match {em['diff']:+.3f} (McNemar p = {_p(em)}), closed accuracy {closed['diff']:+.3f} "
            f"(p = {_p(closed)}), n = {result['n']}"
        )
        lines.append(f"- **{verdict}** — {claim.title}: the paper says {claim.expected}; here {figures}.")
    return lines


def _p(entry: dict) -> str:
    return MISSING if entry.get("p_value") is None else f"{entry['p_value']:.2g}"


def _signed(diff: float | None, low: float | None, high: float | None) -> str:
    if diff is None:
        return MISSING
    return f"{diff:+.3f}" if low is None else f"{diff:+.3f} [{low:+.2f}, {high:+.2f}]"


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


def figure3_points(scores: dict, params: Params) -> dict[int, dict]:
    """Figure 3's curve, stage-1 size → the vqa-rad summary: 0 = single-stage (no stage 1), the sweep points, and the
    full stage-1 set = two-stage; each only where it was evaluated."""
    points = sweep_points(scores)
    if (single := scores.get(("single-stage", SWEEP_SUITE))) is not None:
        points[0] = single
    if (two_stage := scores.get(("two-stage", SWEEP_SUITE))) is not None and (full := full_stage1_size(params)):
        points[full] = two_stage
    return dict(sorted(points.items()))


def sweep_and_human(scores: dict, human: dict, figure: str, points: dict[int, dict]) -> list[str]:
    lines = ["", "## Stage-1 training size sweep (Figure 3)", ""]
    if points:
        lines += ["0 = single-stage (no stage 1); the largest size = two-stage (the full stage-1 set).", ""]
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


def model_selection(params: Params) -> str:
    """One sentence: which suite and metric the registry promotes on, and that test never chooses."""
    reg = params.registry
    on = f"`{reg.suite}` {reg.metric}"
    if reg.suite == VALIDATION:
        where = (
            f"the validation split ({params.data.vqa.validation_fraction:g} of train's questions, held out by image "
            "and never trained on)"
        )
        return f"Model selection: the registry promotes on {on}, {where}; no test suite chooses a model."
    return f"Model selection: the registry promotes on {on}, a test suite: its numbers here are not held out."


def render_markdown(params: Params, scores: dict, human: dict, tests: list, figures: tuple[str, str]) -> str:
    variants = ordered({v for v, _ in scores if sweep_size(v) is None}, VARIANTS)
    suites = ordered({s for _, s in scores}, SUITES)
    lines = [
        "# Results",
        "",
        f"Profile `{params.profile}`. Each value is a mean with its 95 % percentile-bootstrap interval "
        f"({params.eval.bootstrap_resamples} resamples, seed {params.eval.seed}); {MISSING} = not evaluated. "
        f"VQA split: {split_name(params.data.vqa)} (`data.vqa.split`).",
        f"Precision `{precision_label(params.quantization)}`, in training and evaluation alike.",
        model_selection(params),
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
        "",
        "## What this run reproduces of the paper's claims",
        "",
        *claim_verdicts(tests),
        *sweep_and_human(scores, human, figures[1], figure3_points(scores, params)),
        "",
    ]
    return "\n".join(lines)


def _estimate(summary: dict | None, name: str):
    from med_idefics.plots import Estimate

    summary = summary or {}
    return Estimate(summary.get(name), summary.get(f"{name}_ci_low"), summary.get(f"{name}_ci_high"))


def render_figures(scores: dict, params: Params) -> tuple[bytes, bytes]:
    from med_idefics import plots

    variants = ordered({v for v, _ in scores if sweep_size(v) is None}, VARIANTS)
    panels = {}
    for suite in ordered({s for _, s in scores}, SUITES):
        labels = MED_HALT_LABELS if suite == MED_HALT else METRIC_LABELS
        panels[suite] = {
            label: {v: _estimate(scores.get((v, suite)), name) for v in variants} for name, label in labels.items()
        }
    figure2 = plots.grouped_bars(panels, "Figure 2: metrics by variant (95 % bootstrap intervals)")
    points = figure3_points(scores, params)
    lines = {METRIC_LABELS[m]: [(n, _estimate(s, m)) for n, s in points.items()] for m in SWEEP_METRICS}
    figure3 = plots.curves(
        lines,
        f"Figure 3: {SWEEP_SUITE} vs stage-1 training size (0 = single-stage, largest = two-stage)",
        "stage-1 training examples (n)",
        "score",
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

    scores, human = load_scores(metrics_dir)
    out = Path(out)
    tests = paired_tests(params, predictions_dir)
    figure2, figure3 = render_figures(scores, params)
    written = {
        "figure2": write_atomic(out.parent / FIGURE2_FILE, figure2),
        "figure3": write_atomic(out.parent / FIGURE3_FILE, figure3),
        "paired_tests": write_json(out.parent / PAIRED_TESTS_FILE, {"claims": paired_tests_json(tests)}),
    }
    written["report"] = write_atomic(out, render_markdown(params, scores, human, tests, (FIGURE2_FILE, FIGURE3_FILE)))
    with tracked_run(params, "report", dvc_stage=dvc_stage) as run:
        if run is not None:
            for path in written.values():
                mlflow.log_artifact(str(path))
            mlflow.log_metrics(
                {
                    "variants": len({variant for variant, _ in scores}),
                    "suites": len({suite for _, suite in scores}),
                    "claims_tested": sum(not isinstance(result, str) for _, result in tests),
                }
            )
    return written


def paired_tests_json(tests: list[tuple[Claim, dict | str]]) -> list[dict]:
    """Each claim with its sides and either its test (per metric: a, b, diff, interval, p, significant) or why it
    was not tested."""
    entries = []
    for claim, result in tests:
        entry = asdict(claim)
        entry["a"], entry["b"] = ({"variant": v, "suite": s} for v, s in (claim.a, claim.b))
        entries.append(entry | ({"not_tested": result} if isinstance(result, str) else {"test": result}))
    return entries
