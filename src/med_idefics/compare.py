"""``med-idefics compare``: the evaluated variants side by side in the terminal — one table per suite, a row per
variant, a column per headline metric with its 95 % interval — read from ``metrics/<variant>/<suite>.json``
(:mod:`med_idefics.results`), the same numbers the MLflow runs table shows as ``<suite>/<metric>``."""

from __future__ import annotations

from pathlib import Path

from med_idefics.results import (
    MED_HALT_LABELS,
    METRIC_LABELS,
    METRICS_DIR,
    MISSING,
    VARIANTS,
    ResultsError,
    fmt_metric,
    suite_metric_names,
    load_scores,
    ordered,
)


def comparison_tables(metrics_dir: str | Path = METRICS_DIR, suites: list[str] | None = None) -> list:
    """One ``rich.table.Table`` per suite (default: every suite evaluated), the paper's variants first."""
    from rich.table import Table

    from med_idefics.data.suites import SUITES

    scores, _ = load_scores(metrics_dir)
    found = {suite for _, suite in scores}
    chosen = list(dict.fromkeys(suites)) if suites else [s for s in ordered(found, SUITES) if s in found]
    missing = [suite for suite in chosen if suite not in found]
    if missing:
        raise ResultsError(
            f"no metrics for suite(s) {', '.join(missing)} under {metrics_dir}/ (found: {', '.join(sorted(found))}); "
            "evaluate them first (`med-idefics evaluate --suite ...`)"
        )
    labels = {**METRIC_LABELS, **MED_HALT_LABELS}
    tables = []
    for suite in chosen:
        names = suite_metric_names(suite)
        table = Table(title=f"{suite} (95 % bootstrap intervals)", title_justify="left")
        table.add_column("Variant", no_wrap=True)
        table.add_column("n", justify="right")
        for name in names:
            table.add_column(labels[name], justify="right")
        evaluated = {variant for variant, name in scores if name == suite}
        for variant in (v for v in ordered(evaluated, VARIANTS) if v in evaluated):
            summary = scores[variant, suite]
            table.add_row(variant, str(summary.get("n", MISSING)), *(fmt_metric(summary, name) for name in names))
        tables.append(table)
    return tables
