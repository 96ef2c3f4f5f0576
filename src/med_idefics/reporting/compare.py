"""``med-idefics compare``: the evaluated variants side by side in the terminal, in 80 columns — one table per suite, a
row per variant, a column per headline metric (``value [95 % CI]``, the n it rests on in the header) — read from
``metrics/<variant>/<suite>.json`` (:mod:`med_idefics.reporting.results`), the numbers the MLflow runs table shows as
``<suite>/<short name>``; ``--all-metrics`` adds a second table with the others. Then the image reliance of each blank
suite (with the image − without, its interval and McNemar p) and the consistency under rewording of each suite that
has rewording pairs. ``--from-mlflow`` reads the tracking
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
    fmt,
    fmt_metric,
    headline_metrics,
    load_scores,
    ordered,
    suite_metric_names,
)

LABELS = {**METRIC_LABELS, **MED_HALT_LABELS, "consistency": "Consistent"}
SHORT_LABELS = {"closed_accuracy_strict": "Closed (strict)", "closed_accuracy": "Closed (paper)"}
CONSISTENCY_COLUMNS = {"consistency": "Consistent", "original_accuracy": "Right (orig.)",
                       "rewording_accuracy": "Right (reword.)", "both_right": "Both right"}  # fmt: skip
RELIANCE_FIELDS = {"with_image": "closed_with_image", "without_image": "closed_accuracy_strict",
                   "image_reliance": "image_reliance", "p_value": "image_reliance_p", "yes_rate": "yes_rate",
                   "truth_yes_rate": "truth_yes_rate", "n_yes_no": "n_yes_no"}  # fmt: skip
WIDTH = 80


def _label(name: str) -> str:
    return SHORT_LABELS.get(name, LABELS.get(name, name))


def n_of(summary: dict, name: str) -> int | None:
    """How many questions a metric of a suite's summary rests on: closed ones, open ones, rewording pairs, or all."""
    key = "n_closed" if name.startswith("closed_accuracy") else "n_open" if name == "open_recall" else "n"
    key = "n_pairs" if name in CONSISTENCY_COLUMNS else key
    value = summary.get(key)
    return value if isinstance(value, int) else None


def _span(counts) -> str:
    """The n a column rests on: one count, or the smallest–largest."""
    found = sorted({n for n in counts if isinstance(n, int)})
    return MISSING if not found else str(found[0]) if len(found) == 1 else f"{found[0]}–{found[-1]}"


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
    """The metric columns of a suite's tables: the headline ones (consistency has a table of its own), then
    (``all_metrics``) the rest; none for a suite without headline metrics (validation-blank: its image reliance)."""
    names = [name for name in headline_metrics(suite).values() if name not in CONSISTENCY_COLUMNS]
    rest = [name for name in suite_metric_names(suite) if name not in names]
    return [group for group in (names, rest if all_metrics else []) if group]


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
                headers.append(f"{_label(name)}\nn = {_span(n_of(s, name) for s in evaluated.values())}")
            more = " (more metrics)" if number else ""
            table = _table(f"{suite}{more}: value [95 % CI]", headers)
            for variant in (v for v in ordered(set(evaluated), VARIANTS) if v in evaluated):
                table.add_row(variant, *(fmt_metric(evaluated[variant], name) for name in names))
            tables.append(table)
        tables += _reliance_tables(suite, evaluated) + _consistency_tables(suite, evaluated, all_metrics)
    return tables


def _variants(evaluated: dict[str, dict], key: str) -> list[str]:
    return [v for v in ordered(set(evaluated), VARIANTS) if v in evaluated and evaluated[v].get(key) is not None]


def _reliance_tables(suite: str, evaluated: dict[str, dict]) -> list:
    """A blank suite's image reliance: closed accuracy with the image and without, the difference, its one-sided
    McNemar p."""
    from med_idefics.data.suites import BLANKED

    variants = _variants(evaluated, "image_reliance")
    if suite not in BLANKED or not variants:
        return []
    n = _span(evaluated[v].get("n_closed") for v in variants)
    columns = ["With image", "Blank", "Reliance [95 % CI]", "p, 1-sided"]
    table = _table(f"image reliance: {BLANKED[suite]} − {suite}, strict closed, n = {n}", columns)
    for variant in variants:
        summary = evaluated[variant]
        p = summary.get("image_reliance_p")
        table.add_row(variant, fmt(summary.get("closed_with_image")), fmt(summary.get("closed_accuracy_strict")),
                      fmt_metric(summary, "image_reliance"), MISSING if p is None else f"{p:.2g}")  # fmt: skip
    return [table]


def _consistency_tables(suite: str, evaluated: dict[str, dict], all_metrics: bool) -> list:
    """Consistency under rewording on the suite's rewording pairs; ``all_metrics`` adds right on both."""
    variants = _variants(evaluated, "consistency")
    if not variants:
        return []
    shown = [name for name in CONSISTENCY_COLUMNS if all_metrics or name != "both_right"]
    title = f"{suite}, rewording pairs (n = {_span(evaluated[v].get('n_pairs') for v in variants)}): value [95 % CI]"
    table = _table(title, [CONSISTENCY_COLUMNS[name] for name in shown])
    for variant in variants:
        table.add_row(variant, *(fmt_metric(evaluated[variant], name) for name in shown))
    return [table]


def comparison_json(metrics_dir: str | Path = METRICS_DIR, suites: list[str] | None = None) -> dict[str, Any]:
    """``suites``: suite → variant → metric → value, ci_low, ci_high, n: every metric of every chosen suite (with
    consistency under rewording where the suite has rewording pairs); ``image_reliance``: blank suite → variant →
    with_image, without_image, image_reliance, its interval, p_value, n (closed questions), the yes-rates."""
    scores, _ = load_scores(metrics_dir)
    out: dict[str, Any] = {}
    reliance: dict[str, Any] = {}
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
                    for metric in (*suite_metric_names(suite), *_extra_metrics(summary))
                }
                if summary.get("image_reliance") is not None:
                    reliance.setdefault(suite, {})[variant] = _reliance_json(summary)
    return {"suites": out, "image_reliance": reliance}


def _extra_metrics(summary: dict) -> tuple[str, ...]:
    """Consistency under rewording, where the suite has rewording pairs."""
    return tuple(CONSISTENCY_COLUMNS) if summary.get("consistency") is not None else ()


def _reliance_json(summary: dict) -> dict[str, Any]:
    found = {field: summary.get(key) for field, key in RELIANCE_FIELDS.items()}
    found |= {"ci_low": summary.get("image_reliance_ci_low"), "ci_high": summary.get("image_reliance_ci_high")}
    return found | {"n": summary.get("n_closed")}


def seed_tables(params, suites: list[str] | None = None, any_config: bool = False) -> tuple[list, dict[str, Any]]:
    """From the tracking store: per suite, each variant's headline metrics as ``mean ± sd (seeds)``; and the JSON."""
    from med_idefics.reporting.seeds import collect, fmt_mean_sd, to_json
    from med_idefics.tracking.store import resolve_tracking_uri

    found = collect(params, suites, any_config)
    store = resolve_tracking_uri(params)
    chosen = _chosen({suite for suite, _ in found.values}, suites, f"the tracking store {store}")
    data = to_json(found, store)
    data["suites"] = {suite: data["suites"][suite] for suite in chosen}
    tables = []
    for suite in chosen:
        by_variant = data["suites"][suite]
        seeds = sorted({seed for entry in by_variant.values() for seed in entry["seeds"]})
        names = headline_metrics(suite)
        # four "0.871 ± 0.033 (3)" columns do not fit 80: consistency gets a table of its own, as without --from-mlflow
        groups = [[s for s in names if names[s] not in CONSISTENCY_COLUMNS], [s for s in names if names[s] in
                                                                              CONSISTENCY_COLUMNS]]  # fmt: skip
        for number, shorts in enumerate(group for group in groups if group):
            title = f"{suite}, seeds {', '.join(map(str, seeds))}{' (more metrics)' if number else ''}"
            table = _table(f"{title}: mean ± sd (seeds)", [_label(names[short]) for short in shorts])
            for variant in (v for v in ordered(set(by_variant), VARIANTS) if v in by_variant):
                table.add_row(variant, *(fmt_mean_sd(by_variant[variant]["metrics"][short]) for short in shorts))
            tables.append(table)
    return tables, data | {"left_out_note": _left_out_note(found.left_out)}


def _left_out_note(count: int) -> str:
    """Under 80 columns: how many runs of another configuration (a param besides seed differs) were left out."""
    return f"{count} evaluation runs of another configuration left out (--any-config: include them)" if count else ""
