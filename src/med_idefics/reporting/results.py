"""The stages' results on disk, in one place for every stage that writes or reads them (evaluate, report, review,
registry, compare):

- ``metrics/<variant>/<suite>.json``: the suite's scores (:func:`med_idefics.scoring.metrics.summarize`, or
  :func:`~med_idefics.scoring.metrics.summarize_abstention` for med-halt), every metric with its interval: numbers only;
- ``reports/headline.json``: the headline numbers of every variant and suite (:func:`headline_table`), the one file
  DVC declares as metrics, so that ``dvc exp show`` has a few dozen columns, not hundreds;
- ``metrics/<variant>/<suite>-human.json``: human grades (:mod:`med_idefics.reporting.review`);
- ``metrics/<variant>/run_info.json``: the ids behind the scores (not a DVC metric): ``variant``,
  ``training_run_id`` (the MLflow run that made what was evaluated) and ``eval_runs`` (suite → its evaluation run);
- ``outputs/predictions/<variant>/<suite>.jsonl``: the predictions the scores were computed from;
- ``run_info.json`` beside a trained adapter (``outputs/<variant>/``) and beside the base folder
  (``<model.base_dir>-run/``, never inside it: :func:`base_run_folder`): ``run_id``, the MLflow run that made it, and
  what else names it (variant, stage, …).

Light on purpose (json and pathlib only): the CLI imports :class:`ResultsError` on every start.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from med_idefics.files import write_json

METRICS_DIR = "metrics"
PREDICTIONS_DIR = "outputs/predictions"
HUMAN_SUFFIX = "-human"  # metrics/<variant>/<suite>-human.json
RUN_INFO_FILE = "run_info.json"
BASE_RUN_SUFFIX = "-run"  # the base's run record: <model.base_dir>-run/run_info.json
CI_SUFFIXES = ("_ci_low", "_ci_high")
VARIANTS = ("base", "single-stage", "two-stage")  # the paper's variants: listed first, in this order
# Display names of the headline metrics (med_idefics.scoring.metrics.METRICS and ABSTENTION_METRICS), in tables and
# figures
METRIC_LABELS = {  # table columns, in order: first the closed accuracy that promotion ranks on
    "closed_accuracy_strict": "Closed acc. (strict)",
    "exact_match": "EM",
    "f1": "F1",
    "bleu": "BLEU",
    "closed_accuracy": "Closed acc. (paper)",
    "open_recall": "Open recall",
}
MED_HALT_LABELS = {"abstention_rate": "Abstention rate", "hallucination_rate": "Hallucination rate"}
# The headline metrics: short name → metric. A training run carries them as ``<suite>/<short>`` (values only, to 3
# decimals; the intervals stay on the evaluation runs), and reports/headline.json holds them per variant and suite.
# Short because MLflow's runs table shows the first ~15 characters of a column's name ("vqa-rad/closed").
HEADLINE = {"closed": "closed_accuracy_strict", "em": "exact_match", "open": "open_recall"}
MED_HALT_HEADLINE = {"abstain": "abstention_rate"}
# A blank suite's one column: image reliance reads as <suite>/closed − blank/closed beside it (its interval and p are
# in the blank suite's scores). validation-blank has none: promotion's gate reads it from the full scores.
BLANK_HEADLINE = {"closed": "closed_accuracy_strict"}
CONSISTENCY_HEADLINE = {"consistent": "consistency"}  # on the suites scored for it, where they have rewording pairs
HEADLINE_DIGITS = 3  # 1/450 questions = 0.0022: a fourth digit would be noise on the demo's suites
MISSING = "—"


class ResultsError(ValueError):
    """A result file is missing or unreadable, or there is nothing to read; the message names the file and what
    to do."""


def metrics_path(metrics_dir: str | Path, variant: str, suite: str, human: bool = False) -> Path:
    return Path(metrics_dir) / variant / f"{suite}{HUMAN_SUFFIX if human else ''}.json"


def predictions_path(predictions_dir: str | Path, variant: str, suite: str) -> Path:
    return Path(predictions_dir) / variant / f"{suite}.jsonl"


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResultsError(f"{path}: unreadable ({err}); re-run the stage that writes it") from err
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: expected a JSON object, got {type(data).__name__}; re-run the stage writing it")
    return data


# --------------------------------------------------------------------------------------------------------------------
# Run info: the MLflow ids that go with an output folder


def read_run_info(folder: str | Path) -> dict:
    """``<folder>/run_info.json``, or ``{}`` when there is none."""
    path = Path(folder) / RUN_INFO_FILE
    return read_json(path) if path.is_file() else {}


def write_run_info(folder: str | Path, info: Mapping[str, Any]) -> Path:
    """Merge ``info`` into ``<folder>/run_info.json`` (a mapping value is merged one level down: ``eval_runs`` of
    several suites accumulate)."""
    merged = read_run_info(folder)
    for key, value in info.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, Mapping) else value
    return write_json(Path(folder) / RUN_INFO_FILE, merged)


def base_run_folder(base_dir: str | Path) -> Path:
    """Where the base's run record lives: beside the base folder, not in it. The base folder is a DVC output that
    every training and evaluation stage depends on; a run id inside it would change its hash on every rerun of the
    cheap base stage, and DVC would rerun every GPU stage after it."""
    base_dir = Path(base_dir)
    return base_dir.with_name(base_dir.name + BASE_RUN_SUFFIX)


def run_id_of(folder: str | Path) -> str | None:
    """The MLflow run that made the output in ``folder`` (a trained variant's folder, the base folder), if recorded."""
    return read_run_info(folder).get("run_id") or None


def eval_run_id(metrics_dir: str | Path, variant: str, suite: str) -> str | None:
    """The MLflow run that evaluated ``variant`` on ``suite``, as recorded beside its metrics."""
    return read_run_info(Path(metrics_dir) / variant).get("eval_runs", {}).get(suite) or None


# --------------------------------------------------------------------------------------------------------------------
# Scores


def load_scores(metrics_dir: str | Path) -> tuple[dict[tuple[str, str], dict], dict[tuple[str, str], dict]]:
    """(variant, suite) → the evaluation's scores, and → the human grades; an error when there are no scores."""
    scores: dict[tuple[str, str], dict] = {}
    human: dict[tuple[str, str], dict] = {}
    for path in sorted(Path(metrics_dir).glob("*/*.json")):
        variant, name = path.parent.name, path.stem
        if path.name == RUN_INFO_FILE:
            continue
        if name.endswith(HUMAN_SUFFIX):
            human[variant, name.removesuffix(HUMAN_SUFFIX)] = read_json(path)
        else:
            scores[variant, name] = read_json(path)
    if not scores:
        raise ResultsError(
            f"no evaluation metrics under {metrics_dir}/ (expected <variant>/<suite>.json): "
            "run the evaluations first (`dvc repro`)"
        )
    return scores, human


def suite_metric_names(suite: str) -> tuple[str, ...]:
    """Every metric a suite's scores hold: the answer metrics, or abstention and hallucination for med-halt."""
    from med_idefics.data.suites import MED_HALT  # imported here: it pulls in numpy and pyarrow

    return tuple(MED_HALT_LABELS if suite == MED_HALT else METRIC_LABELS)


def headline_metrics(suite: str) -> dict[str, str]:
    """The suite's headline metrics: short name → metric (:data:`HEADLINE`; :data:`MED_HALT_HEADLINE`,
    :data:`BLANK_HEADLINE`, none for ``validation-blank``; :data:`CONSISTENCY_HEADLINE` besides on the suites whose
    rewording pairs are scored)."""
    from med_idefics.data.suites import BLANK, CONSISTENCY_SUITES, MED_HALT, VALIDATION_BLANK

    special = {MED_HALT: MED_HALT_HEADLINE, BLANK: BLANK_HEADLINE, VALIDATION_BLANK: {}}
    if suite in special:
        return dict(special[suite])
    return HEADLINE | (CONSISTENCY_HEADLINE if suite in CONSISTENCY_SUITES else {})


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def headline(suite: str, scores: Mapping[str, Any], digits: int = HEADLINE_DIGITS) -> dict[str, float]:
    """``<suite>/<short>`` → value (rounded to ``digits``) for each headline metric that has one: what a training run
    carries of its evaluation on ``suite`` (MLflow groups charts by the part before ``/``), and a registered version's
    logged model."""
    found = {}
    for short, name in headline_metrics(suite).items():
        if (value := _number(scores.get(name))) is not None:
            found[f"{suite}/{short}"] = round(value, digits)
    return found


def metric_key(suite: str, metric: str) -> str:
    """The name of ``metric`` on ``suite`` beside the headline: ``<suite>/<short>`` for a headline metric
    (``validation/closed``), else ``<suite>/<metric>``; its interval adds :data:`CI_SUFFIXES`."""
    short = {name: short for short, name in headline_metrics(suite).items()}.get(metric, metric)
    return f"{suite}/{short}"


def headline_table(scores: Mapping[tuple[str, str], Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """variant → suite → short name → value: the compact file of headline numbers DVC declares as metrics (the
    paper's variants first, suites in the order of :data:`med_idefics.data.suites.KNOWN_SUITES`)."""
    from med_idefics.data.suites import KNOWN_SUITES

    table: dict[str, dict[str, dict[str, float]]] = {}
    for variant in ordered({v for v, _ in scores}, VARIANTS):
        for suite in ordered({s for v, s in scores if v == variant}, KNOWN_SUITES):
            numbers = {
                key.split("/", 1)[1]: value for key, value in headline(suite, scores.get((variant, suite), {})).items()
            }
            if numbers:
                table.setdefault(variant, {})[suite] = numbers
    return table


def ordered(found: set[str], canonical: tuple[str, ...]) -> list[str]:
    """The canonical names first (always), then any others found, sorted."""
    return [*canonical, *sorted(found - set(canonical))]


def fmt(value: float | None, low: float | None = None, high: float | None = None) -> str:
    """``0.557 [0.51, 0.60]``; ``—`` for a value that does not exist."""
    if value is None:
        return MISSING
    return f"{value:.3f}" if low is None or high is None else f"{value:.3f} [{low:.2f}, {high:.2f}]"


def fmt_metric(summary: Mapping | None, name: str) -> str:
    if not summary:
        return MISSING
    return fmt(summary.get(name), summary.get(f"{name}_ci_low"), summary.get(f"{name}_ci_high"))


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub-flavoured Markdown table, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]
