"""The model registry's client: the writes and reads the ``register`` and ``promote`` stages share.

A version keeps its evidence where MLflow 3 puts a model's scores: on the logged model it was registered from. Its
metrics (``<suite>/<short>``, :func:`med_idefics.reporting.results.metric_key`) are logged through the version's
source run — the registry's compare view lines versions up by their source runs' metrics, and the logged model's page
lists them — and the evaluation run behind each suite is the logged model's tag ``<suite>.eval_run_id``. Every other
number is in the source run's ``evaluation/`` artifacts (:func:`full_scores`). The version itself carries a handful of
tags and a Markdown description, whose second paragraph, when there is one, is the promotion's decision
(:data:`PROMOTION_MARK`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from med_idefics.reporting.results import CI_SUFFIXES, metric_key
from med_idefics.tracking.provenance import NONE, redact

_TAG_LIMIT = 5000  # MLflow allows 8000 characters per model version tag value
EVAL_RUN_SUFFIX = ".eval_run_id"  # a logged model's tag <suite>.eval_run_id: the run that evaluated it on <suite>
EVALUATION_ARTIFACTS = "evaluation"  # the source run's folder of the full scores: metrics/<variant>/*.json
PROMOTION_MARK = "**Promotion**"  # the description's paragraph that promote writes
# What versions registered before the evidence moved to their logged models carried as tags: promotion's long tags.
LEGACY_PROMOTION_TAGS = ("promotion.reason", "promotion.metric", "promotion.compared_with",
                         "promotion.champion_score", "promotion.candidates")  # fmt: skip


@dataclass(frozen=True)
class Evidence:
    metrics: dict[str, float]  # the latest value of each metric: <suite>/<short>, with _ci_low/_ci_high where logged
    eval_runs: dict[str, str]  # suite → the evaluation run the scores come from

    def value(self, suite: str, metric: str, suffix: str = "") -> float | None:
        return self.metrics.get(metric_key(suite, metric) + suffix)


def set_version_tag(client, name: str, version: str, key: str, value: Any) -> None:
    retry_write(client.set_model_version_tag, name, version, key, redact(str(value))[:_TAG_LIMIT])


def delete_version_tags(client, name: str, version, keys: Iterable[str]) -> None:
    for key in keys:
        retry_write(client.delete_model_version_tag, name, str(version), key)


def set_description(client, name: str, version: str, text: str) -> None:
    retry_write(client.update_model_version, name, version, redact(text))


def retry_write(write, *args, attempts: int = 5) -> None:
    """A registry write, retried: MLflow's SQL store upserts tags and aliases by select-then-insert, so a concurrent
    writer of the same key can make the insert fail once; the retry finds the row and updates it."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return write(*args)
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def versions(client, name: str) -> list:
    return list(client.search_model_versions(f"name = '{name}'"))


def number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def logged_model_id(version) -> str | None:
    """The logged model a version was registered from (its source ``models:/<model_id>``); None for a version made
    from a run's artifacts (``runs:/…``, MLflow 2)."""
    if getattr(version, "model_id", None):
        return version.model_id
    found = re.fullmatch(r"models:/([^/@]+)", version.source or "")
    return found.group(1) if found else None


def log_evidence(client, run_id: str, model_id: str, metrics: Mapping[str, float], eval_runs: Mapping) -> None:
    """Put ``metrics`` on the logged model ``model_id`` through run ``run_id`` (its source run), those whose latest
    value differs, one step after the last; and ``eval_runs`` (suite → run or None) as its ``<suite>.eval_run_id``
    tags. Registering the same package again with the same scores writes no metric."""
    from mlflow.entities import Metric

    logged = client.get_logged_model(model_id).metrics or []
    current = _latest(logged)
    step = max((m.step for m in logged), default=-1) + 1
    now = int(time.time() * 1000)
    changed = [Metric(key, float(value), now, step, model_id=model_id) for key, value in metrics.items()
               if current.get(key) != value]  # fmt: skip
    if changed:
        client.log_batch(run_id, metrics=changed)
    if eval_runs:
        client.set_logged_model_tags(model_id, {f"{s}{EVAL_RUN_SUFFIX}": run or NONE for s, run in eval_runs.items()})


def evidence(client, version) -> Evidence:
    """What ``version`` was evaluated on: its logged model's metrics and evaluation runs. A version registered before
    they moved there carries them as its own tags (``<suite>.<metric>`` unrounded, ``<suite>.eval_run_id``), read
    in the same names, so that a store's older versions (a team's, a champion among them) keep their evidence."""
    from mlflow.exceptions import MlflowException

    metrics, tags = {}, {}
    if model_id := logged_model_id(version):
        try:
            model = client.get_logged_model(model_id)
            metrics, tags = _latest(model.metrics or []), dict(model.tags or {})
        except MlflowException:  # the logged model was deleted
            pass
    if not metrics:
        metrics, tags = _legacy_metrics(version.tags), version.tags
    runs = {key.removesuffix(EVAL_RUN_SUFFIX): run for key, run in tags.items() if key.endswith(EVAL_RUN_SUFFIX)}
    return Evidence(metrics, {suite: run for suite, run in runs.items() if run and run != NONE})


def full_scores(version, suite: str) -> dict:
    """Every number of the version's evaluation on ``suite`` (``evaluation/<suite>.json`` in its source run), for a
    metric its logged model does not carry; ``{}`` when there is none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not version.run_id:
        return {}
    try:
        scores = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/{EVALUATION_ARTIFACTS}/{suite}.json")
    except (MlflowException, OSError, ValueError):  # no such run or artifact (a version registered before)
        return {}
    return scores if isinstance(scores, dict) else {}


def _latest(metrics: list) -> dict[str, float]:
    """Each key's last value (highest step, then latest time), as MLflow shows a run's metric."""
    last: dict[str, Any] = {}
    for m in metrics:
        if m.key not in last or (m.step, m.timestamp) >= (last[m.key].step, last[m.key].timestamp):
            last[m.key] = m
    return {key: m.value for key, m in last.items() if m.value is not None and math.isfinite(m.value)}


def _legacy_metrics(tags: Mapping[str, str]) -> dict[str, float]:
    found = {}
    for key, text in tags.items():
        suite, _, name = key.partition(".")
        scored = name and suite != "promotion" and not key.endswith(EVAL_RUN_SUFFIX)
        value = number(text) if scored else None
        if value is not None:
            base = next((name.removesuffix(s) for s in CI_SUFFIXES if name.endswith(s)), name)
            found[metric_key(suite, base) + name[len(base) :]] = value
    return found


def legacy_tags(tags: Mapping[str, str], suites: Iterable[str]) -> list[str]:
    """The tags a version registered before the evidence moved to its logged model carries beyond today's: every
    score (``<suite>.<metric>``), its evaluation runs, the adapter hash (the package hash holds it) and promotion's
    long tags (now the description's promotion paragraph)."""
    prefixes = tuple(f"{suite}." for suite in suites)
    return [k for k in tags if k.startswith(prefixes) or k == "adapter_sha256" or k in LEGACY_PROMOTION_TAGS]


def promotion_paragraph(description: str | None) -> str | None:
    return next((p for p in (description or "").split("\n\n") if p.startswith(PROMOTION_MARK)), None)


def with_promotion(description: str | None, paragraph: str | None) -> str:
    """``description`` with its promotion paragraph replaced by ``paragraph`` (starting with :data:`PROMOTION_MARK`),
    placed second: after the first line, which the registered model's list of versions shows."""
    paragraphs = [p for p in (description or "").split("\n\n") if p and not p.startswith(PROMOTION_MARK)]
    if paragraph:
        paragraphs.insert(min(1, len(paragraphs)), paragraph)
    return "\n\n".join(paragraphs)
