"""``med-idefics compare``: the evaluated variants side by side in the terminal, in 80 columns — one table per suite, a
row per variant, a column per headline metric (``value [95 % CI]``, the n it rests on in the header) — read from
``metrics/<variant>/<suite>.json`` (:mod:`med_idefics.reporting.results`), the numbers the MLflow runs table shows as
``<suite>/<short name>``; ``--all-metrics`` adds a second table with the others. ``--from-mlflow`` reads the tracking
store instead and shows each headline metric as mean ± sd over the training seeds found there
(:mod:`med_idefics.reporting.seeds`). ``--json`` prints the same numbers as JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from med_idefics.reporting.results import (
    MED_HALT_LABELS,
    METRIC_LABELS,
    METRICS_DIR,
    MISSING,
    VARIANTS,
    ResultsError,
    fmt_metric,
    headline_metrics,
    load_scores,
    ordered,
    suite_metric_names,
)

LABELS = {**METRIC_LABELS, **MED_HALT_LABELS}
SHORT_LABELS = {"closed_accuracy_strict": "Closed (strict)", "closed_accuracy": "Closed (paper)"}
WIDTH = 80


def _label(name: str) -> str:
    return SHORT_LABELS.get(name, LABELS.get(name, name))


def n_of(summary: dict, name: str) -> int | None:
    """How many questions a metric of a suite's summary rests on: closed ones, open ones, or all."""
    key = "n_closed" if name.startswith("closed_accuracy") else "n_open" if name == "open_recall" else "n"
    value = summary.get(key)
    return value if isinstance(value, int) else None


def _chosen(found: set[str], suites: list[str] | None, where: str) -> list[str]:
    from med_idefics.data.suites import KNOWN_SUITES

    chosen = list(dict.fromkeys(suites)) if suites else [s for s in ordered(found, KNOWN_SUITES) if s in found]
    missing = [suite for suite in chosen if suite not in found]
    if missing:
        raise ResultsError(
            f"no metrics for suite(s) {', '.join(missing)} in {where} (found: {', '.join(sorted(found)) or 'none'}); "
            "evaluate them first (`med-idefics evaluate --suite ...`)"
        )
    return chosen


def _table(title: str, columns: list[str]):
    from rich import box
    from rich.table import Table

    # min_width: a narrow table (med-halt's one column) would otherwise wrap its title over two lines
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, min_width=min(len(title), WIDTH)
    )
    table.add_column("Variant", no_wrap=True)
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    return table


def _groups(suite: str, all_metrics: bool) -> list[list[str]]:
    """The metric columns of a suite's tables: the headline ones, then (``all_metrics``) the rest."""
    names = list(headline_metrics(suite).values())
    rest = [name for name in suite_metric_names(suite) if name not in names]
    return [names, rest] if all_metrics and rest else [names]


def comparison_tables(
    metrics_dir: str | Path = METRICS_DIR, suites: list[str] | None = None, all_metrics: bool = False
) -> list:
    """``rich.table.Table``s per suite (default: every suite evaluated), the paper's variants first."""
    scores, _ = load_scores(metrics_dir)
    tables = []
    for suite in _chosen({suite for _, suite in scores}, suites, f"{metrics_dir}/"):
        evaluated = {variant: summary for (variant, name), summary in scores.items() if name == suite}
        for number, names in enumerate(_groups(suite, all_metrics)):
            headers = []
            for name in names:
                counts = sorted({n for s in evaluated.values() if (n := n_of(s, name)) is not None})
                n = MISSING if not counts else str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
                headers.append(f"{_label(name)}\nn = {n}")
            more = " (more metrics)" if number else ""
            table = _table(f"{suite}{more}: value [95 % CI]", headers)
            for variant in (v for v in ordered(set(evaluated), VARIANTS) if v in evaluated):
                table.add_row(variant, *(fmt_metric(evaluated[variant], name) for name in names))
            tables.append(table)
    return tables


def comparison_json(metrics_dir: str | Path = METRICS_DIR, suites: list[str] | None = None) -> dict[str, Any]:
    """suite → variant → metric → value, ci_low, ci_high, n: every metric of every chosen suite."""
    scores, _ = load_scores(metrics_dir)
    out: dict[str, Any] = {}
    for suite in _chosen({suite for _, suite in scores}, suites, f"{metrics_dir}/"):
        for (variant, name), summary in sorted(scores.items()):
            if name == suite:
                out.setdefault(suite, {})[variant] = {
                    metric: {
                        "value": summary.get(metric),
                        "ci_low": summary.get(f"{metric}_ci_low"),
                        "ci_high": summary.get(f"{metric}_ci_high"),
                        "n": n_of(summary, metric),
                    }
                    for metric in suite_metric_names(suite)
                }
    return {"suites": out}


def seed_tables(params, suites: list[str] | None = None, any_config: bool = False) -> tuple[list, dict[str, Any]]:
    """From the tracking store: per suite, each variant's headline metrics as ``mean ± sd (seeds)``; and the JSON."""
    from med_idefics.reporting.seeds import collect, fmt_mean_sd, to_json
    from med_idefics.tracking.runs import resolve_tracking_uri

    found = collect(params, suites, any_config)
    store = resolve_tracking_uri(params)
    chosen = _chosen({suite for suite, _ in found.values}, suites, f"the tracking store {store}")
    data = to_json(found, store)
    data["suites"] = {suite: data["suites"][suite] for suite in chosen}
    tables = []
    for suite in chosen:
        by_variant = data["suites"][suite]
        seeds = sorted({seed for entry in by_variant.values() for seed in entry["seeds"]})
        shorts = list(headline_metrics(suite))
        columns = [_label(headline_metrics(suite)[short]) for short in shorts]
        table = _table(f"{suite}, seeds {', '.join(map(str, seeds))}: mean ± sd (seeds)", columns)
        for variant in (v for v in ordered(set(by_variant), VARIANTS) if v in by_variant):
            table.add_row(variant, *(fmt_mean_sd(by_variant[variant]["metrics"][short]) for short in shorts))
        tables.append(table)
    return tables, data | {"left_out_note": _left_out_note(found.left_out)}


def _left_out_note(count: int) -> str:
    """Under 80 columns: how many runs of another configuration (a param besides seed differs) were left out."""
    return f"{count} evaluation runs of another configuration left out (--any-config: include them)" if count else ""
