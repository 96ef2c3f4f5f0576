"""Stage: the results report — where the results came from, the paper's Figure-2 table with 95 % intervals and n, the
accuracy by question type and the yes-rate of closed answers, image reliance and consistency under rewording
(:mod:`med_idefics.reporting.robustness`), the paired tests behind the paper's claims (McNemar p
with Holm's correction), the claims over training seeds when the tracking store holds several, the Figure-3
stage-1-size sweep, and human grades — written to ``reports/`` and logged as the MLflow run ``report``.

Reads what the evaluation stage writes (:mod:`med_idefics.reporting.results`): ``metrics/<variant>/<suite>.json`` and
``outputs/predictions/<variant>/<suite>.jsonl``; human grades from ``metrics/<variant>/<suite>-human.json``
(:mod:`med_idefics.reporting.review`); other seeds' runs from the tracking store (:mod:`med_idefics.reporting.seeds`).
What has not been evaluated shows as "—". Beside the report: ``figure2.png``, ``figure3.png`` and its data
``figure3.csv`` (a DVC plot), ``paired_tests.json``, and ``headline.json`` — every variant's headline numbers per
suite, the one file DVC declares as metrics. The ``report`` run holds these files and a few counts; each variant's
numbers live on its own run.
"""

from __future__ import annotations

import os
from pathlib import Path

from med_idefics.config import Params, precision_label
from med_idefics.data.splits import split_name
from med_idefics.data.suites import MED_HALT, SLAKE, SUITES, VALIDATION, VQA_RAD
from med_idefics.files import write_atomic, write_json
from med_idefics.reporting import figures
from med_idefics.reporting.breakdown import type_table, yes_rate_table
from med_idefics.reporting.claims import (
    CLAIMS,
    PAIRED_TESTS_FILE,
    Tested,
    claim_verdicts,
    mcnemar_count,
    paired_sections,
    paired_tests,
    paired_tests_json,
    reproduced,
)
from med_idefics.reporting.figures import figure3_points, figure3_series  # noqa: F401  (figure3_points: the demo checks)
from med_idefics.reporting.results import (
    MED_HALT_LABELS,
    METRIC_LABELS,
    METRICS_DIR,
    MISSING,
    PREDICTIONS_DIR,
    VARIANTS,
    fmt_metric,
    headline_metrics,
    headline_table,
    load_scores,
    markdown_table,
    ordered,
    read_run_info,
)
from med_idefics.reporting.robustness import consistency_section, reliance_section

REPORT_FILE = "reports/results.md"
FIGURE2_FILE, FIGURE3_FILE, FIGURE3_DATA = "figure2.png", "figure3.png", "figure3.csv"  # beside the report
HEADLINE_FILE = "headline.json"  # beside the report: the DVC metrics file
OVER_SEEDS_SUITES = (VQA_RAD, MED_HALT)  # the report's over-seeds table; `compare --from-mlflow` shows any suite


def results_tables(scores: dict[tuple[str, str], dict], variants: list[str], suites: list[str]) -> list[str]:
    rows = []
    for suite in (s for s in suites if s != MED_HALT):
        for variant in variants:
            summary = scores.get((variant, suite)) or {}
            n = (
                f"{summary['n']} ({summary.get('n_closed', MISSING)}/{summary.get('n_open', MISSING)})"
                if summary
                else MISSING
            )
            rows.append([suite, variant, n, *(fmt_metric(summary, name) for name in METRIC_LABELS)])
    lines = markdown_table(["Suite", "Variant", "n (closed/open)", *METRIC_LABELS.values()], rows)
    lines += ["", "Closed accuracy is over the closed questions, open recall over the open ones; the rest over all n."]
    if MED_HALT in suites:
        halt = [
            [variant, str(scores.get((variant, MED_HALT), {}).get("n", MISSING))]
            + [fmt_metric(scores.get((variant, MED_HALT)), name) for name in MED_HALT_LABELS]
            for variant in variants
        ]
        lines += ["", "Med-HALT nonsense questions (lower hallucination is better):", ""]
        lines += markdown_table(["Variant", "n", *MED_HALT_LABELS.values()], halt)
    return lines


def provenance(params: Params, scores: dict, metrics_dir: str | Path) -> list[str]:
    """Where the results come from: training seed, commit, profile, data version, DVC experiment, and the runs read
    (with the seed each training run logged, where the tracking store has it)."""
    from med_idefics.tracking.provenance import data_md5, find_repo_root, git_commit, git_dirty
    from med_idefics.tracking.store import resolve_tracking_uri

    root = find_repo_root()
    dirty = {"true": "uncommitted changes to tracked files", "false": "clean"}.get(
        git_dirty(root), "not a git checkout"
    )
    experiment = os.environ.get("DVC_EXP_NAME")
    baseline = os.environ.get("DVC_EXP_BASELINE_REV", "")
    rows = [
        ["Training seed", f"{params.seed} (`seed`)"],
        ["Commit", f"`{git_commit(root)}` ({dirty})"],
        ["Profile", f"`{params.profile}`"],
        ["Data", f"`data.dvc` md5 `{data_md5(root)}`"],
        ["DVC experiment", f"`{experiment}` (baseline `{baseline[:12]}`)" if experiment else "none (the workspace)"],
        ["Tracking store", f"`{resolve_tracking_uri(params)}`"],
    ]
    lines = ["## Provenance", "", *markdown_table(["", ""], rows), "", "Runs read (MLflow run ids):", ""]
    seeds = _training_seeds(params, metrics_dir, {v for v, _ in scores})
    runs = []
    for variant in ordered({v for v, _ in scores}, VARIANTS):
        if not any(v == variant for v, _ in scores):
            continue
        info = read_run_info(Path(metrics_dir) / variant)
        evaluations = ", ".join(
            f"{suite} `{run[:8]}`" for suite, run in sorted(info.get("eval_runs", {}).items()) if run
        )
        training = info.get("training_run_id")
        runs.append(
            [variant, f"`{training}`" if training else MISSING, seeds.get(variant, MISSING), evaluations or MISSING]
        )
    lines += markdown_table(["Variant", "Training (or base) run", "Its seed", "Evaluation runs"], runs)
    other = sorted({seed for seed in seeds.values() if seed != str(params.seed) and seed != MISSING})
    if other:
        lines += ["", f"**Warning:** some runs read were trained with seed {', '.join(other)}, not {params.seed}."]
    return lines


def _training_seeds(params: Params, metrics_dir: str | Path, variants: set[str]) -> dict[str, str]:
    """variant → the ``seed`` param of the run that trained it, from the tracking store (— where it has none)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from med_idefics.tracking.store import setup_tracking

    setup_tracking(params)
    client, seeds = MlflowClient(), {}
    for variant in variants:
        run_id = read_run_info(Path(metrics_dir) / variant).get("training_run_id")
        try:
            seeds[variant] = client.get_run(run_id).data.params["seed"] if run_id else MISSING
        except (MlflowException, KeyError):
            seeds[variant] = MISSING
    return seeds


def over_seeds(params: Params, scores: dict, tests: Tested) -> list[str]:
    """The headline numbers as mean ± sd over the training seeds in the tracking store (this run's seed from its own
    files), and in how many seeds each claim held; nothing when the store holds one seed only."""
    from mlflow.exceptions import MlflowException

    from med_idefics.reporting.seeds import collect, fmt_mean_sd, summary

    try:
        found = collect(params, list(OVER_SEEDS_SUITES))
    except MlflowException as err:  # the report of this seed stands without the others
        return ["", "## Over training seeds", "", f"{MISSING} the tracking store could not be read: {err}"]
    read = (sum(len(runs) for runs in found.runs.values()), len(found.claims))  # evaluation and report runs
    for (variant, suite), numbers in scores.items():
        if suite in OVER_SEEDS_SUITES:
            found.values.setdefault((suite, variant), {})[params.seed] = numbers
    found.claims[params.seed] = {claim.title: reproduced(claim, result) for claim, result in tests}
    seeds = found.seeds()
    if len(seeds) < 2:
        return []
    left_out = f"; {found.left_out} runs of another configuration left out" if found.left_out else ""
    lines = ["", "## Over training seeds", ""]
    lines += [
        f"Seeds {', '.join(map(str, seeds))}: this run's and the tracking store's runs of the same configuration "
        f"(every param but `seed` equal{left_out}): {read[0]} evaluation runs and {read[1]} report runs read from the "
        "store (their ids: `med-idefics compare --from-mlflow --json`). Each value: mean ± sd over the seeds (how "
        "many).",
        "",
    ]
    columns = [(suite, short) for suite in OVER_SEEDS_SUITES for short in headline_metrics(suite)]
    variants = figures.paper_variants({(v, s): None for s, v in found.values})
    rows = []
    for variant in variants:
        by_suite = {suite: summary(found.values.get((suite, variant), {}), suite) for suite in OVER_SEEDS_SUITES}
        rows.append([variant, *(fmt_mean_sd(by_suite[suite][short]) for suite, short in columns)])
    lines += markdown_table(["Variant", *(f"{suite} {short}" for suite, short in columns)], rows)
    lines += ["", "The paper's claims, reproduced (as above: the claimed sign, Holm-adjusted McNemar p < 0.05) in:", ""]
    claim_rows = []
    for claim in CLAIMS:
        verdicts = {seed: v[claim.title] for seed, v in found.claims.items() if v.get(claim.title) is not None}
        held = [str(seed) for seed, ok in sorted(verdicts.items()) if ok]
        claim_rows.append([claim.title, f"{len(held)} of {len(verdicts)}", ", ".join(held) or MISSING])
    return lines + markdown_table(["Claim", "Seeds where it held", "Which"], claim_rows)


def human_section(human: dict) -> list[str]:
    lines = ["", "## Human evaluation", ""]
    if not human:
        return [
            *lines,
            f"{MISSING} none imported yet (`med-idefics review export`, grade, `med-idefics review import`).",
        ]
    rows = [
        [variant, suite, f"{h.get('n_right', MISSING)}/{h.get('n', MISSING)}", fmt_metric(h, "human_accuracy")]
        for (variant, suite), h in sorted(human.items())
    ]
    return lines + markdown_table(["Variant", "Suite", "Right / n", "Human accuracy"], rows)


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


def breakdown_sections(params: Params, predictions_dir: str | Path, scores: dict, variants: list[str]) -> list[str]:
    lines = []
    for suite in (s for s in (VQA_RAD, SLAKE) if any(name == s for _, name in scores)):
        lines += ["", f"## Accuracy by question type ({suite})", ""]
        lines += ["Exact match (the paper's, as in the claims) with its 95 % bootstrap interval.", ""]
        lines += type_table(params, predictions_dir, variants, suite)
    lines += ["", f"## Closed answers: yes-rate ({VQA_RAD})", ""]
    lines += ["Over the closed questions whose answer is yes or no: the share of each answer (neither: no yes/no word, "
              "or both).", ""]  # fmt: skip
    return lines + yes_rate_table(predictions_dir, variants, VQA_RAD)


def render_markdown(params: Params, scores: dict, human: dict, tests: Tested, sections: dict[str, list[str]]) -> str:
    variants = figures.paper_variants(scores)
    suites = ordered({s for _, s in scores}, SUITES)
    lines = [
        "# Results",
        "",
        f"Profile `{params.profile}`, training seed {params.seed}. Each value is a mean with its 95 % "
        f"percentile-bootstrap interval ({params.eval.bootstrap_resamples} resamples, seed {params.eval.seed}); "
        f"{MISSING} = not evaluated. VQA split: {split_name(params.data.vqa)} (`data.vqa.split`).",
        f"Precision `{precision_label(params.quantization)}`, in training and evaluation alike.",
        model_selection(params),
        "",
        *sections["provenance"],
        "",
        "## Figure 2: variants × suites",
        "",
        *results_tables(scores, variants, suites),
        "",
        f"![Figure 2]({FIGURE2_FILE})",
        *sections["breakdown"],
        *sections["reliance"],
        *sections["consistency"],
        "",
        "## Paired tests of the paper's claims",
        "",
        "Same questions, matched by id. Significant at 0.05: for EM and closed accuracy the exact McNemar test, its "
        f"p-value Holm-adjusted over all {mcnemar_count(tests)} McNemar tests of this report (each tested claim × "
        "the three 0/1 metrics); for the others a paired-bootstrap interval excluding 0.",
        *paired_sections(tests),
        "",
        "## What this run reproduces of the paper's claims",
        "",
        *claim_verdicts(tests),
        *sections["seeds"],
        "",
        "## Stage-1 training size sweep (Figure 3)",
        "",
        *figures.sweep_table(figure3_series(scores, params)),
        "",
        f"![Figure 3]({FIGURE3_FILE}) (its data: `{FIGURE3_DATA}`)",
        *human_section(human),
        "",
    ]
    return "\n".join(lines)


def build_report(
    params: Params,
    metrics_dir: str | Path = METRICS_DIR,
    predictions_dir: str | Path = PREDICTIONS_DIR,
    out: str | Path = REPORT_FILE,
    dvc_stage: str | None = None,
) -> dict[str, Path]:
    """Write the report, its figures and data files; log them as the MLflow run ``report``; return the written
    paths."""
    import mlflow

    from med_idefics.reporting.plots import to_png
    from med_idefics.tracking.runs import tracked_run

    scores, human = load_scores(metrics_dir)
    out = Path(out)
    tests = paired_tests(params, predictions_dir)
    points = figure3_series(scores, params)
    variants = figures.paper_variants(scores)
    sections = {
        "provenance": provenance(params, scores, metrics_dir),
        "breakdown": breakdown_sections(params, predictions_dir, scores, variants),
        "reliance": reliance_section(params, scores, predictions_dir),
        "consistency": consistency_section(scores),
        "seeds": over_seeds(params, scores, tests),
    }
    written = {
        "figure2": write_atomic(out.parent / FIGURE2_FILE, figures.figure2(scores, variants)),
        "figure3": write_atomic(out.parent / FIGURE3_FILE, to_png(figures.figure3(points))),
        "figure3_data": write_atomic(out.parent / FIGURE3_DATA, figures.figure3_csv(points)),
        "paired_tests": write_json(out.parent / PAIRED_TESTS_FILE, {"claims": paired_tests_json(tests)}),
        "headline": write_json(out.parent / HEADLINE_FILE, headline_table(scores)),
    }
    written["report"] = write_atomic(out, render_markdown(params, scores, human, tests, sections))
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
