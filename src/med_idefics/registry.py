"""Stage: the model registry. Every trained VQA variant becomes a version of ``registry.model_name``; the alias
``registry.alias`` (champion) goes to the best evaluated version.

:func:`register` packages ``outputs/<variant>/adapter`` as a :class:`med_idefics.serving.VqaModel` (logged in an MLflow
run ``register-<variant>``) and tags the version with its variant, training run, package hash and the numbers of
``metrics/<variant>/<suite>.json`` (``<suite>.<metric>``) and the evaluation runs of ``metrics/<variant>/run_info.json``
(``<suite>.eval_run_id``). A package already registered
(same ``package_sha256``) gets its tags refreshed instead of a new version.

:func:`promote` ranks the versions that carry ``<registry.suite>.<registry.metric>`` — a version without evaluation
metrics is never a candidate — and moves the alias to the best one only when it beats the current champion (and, with
``registry.require_significance``, when the paired test of :func:`med_idefics.metrics.compare` on the two versions'
predictions gives p < 0.05). Ties keep the champion, else the earliest version. The decision is recorded as
``promotion.*`` tags on the chosen version and as ``promotion.json`` in an MLflow run ``promote``. The ranking is a
function of the registry's contents, so concurrent promotions agree; the alias is set before any tag, registry writes
are retried when a concurrent writer races them, and every run re-derives the ``promotion.status`` tags from where
the alias points.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from med_idefics import results
from med_idefics.config import ConfigError, Params
from med_idefics.provenance import redact

OUTPUTS_DIR = Path("outputs")
METRICS_DIR, PREDICTIONS_DIR = Path(results.METRICS_DIR), Path(results.PREDICTIONS_DIR)
MODEL_ARTIFACT = "model"
VQA_VARIANT = re.compile(r"^(single-stage|two-stage|two-stage-n(\d+))$")
PROMOTED, KEPT, NO_CANDIDATE = "promoted", "kept", "no-candidate"
CHAMPION_STATUS = "champion"
_TAG_LIMIT = 5000  # MLflow allows 8000 characters per model version tag value

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    variant: str
    version: str
    created: bool  # False: this package was registered before; its tags were refreshed
    tags: dict[str, str]


def vqa_variants(outputs_dir: Path = OUTPUTS_DIR) -> list[str]:
    """The trained VQA variants in ``outputs_dir``: single-stage, two-stage and the sweep's two-stage-n<N>."""
    found = [p.parent.name for p in Path(outputs_dir).glob("*/adapter") if VQA_VARIANT.match(p.parent.name)]
    return sorted(found)


def register(
    params: Params,
    variants: list[str] | None = None,
    outputs_dir: Path = OUTPUTS_DIR,
    metrics_dir: Path = METRICS_DIR,
    dvc_stage: str | None = None,
) -> list[Registration]:
    """Register each variant (default: every one in ``outputs_dir``) as a version of ``registry.model_name``."""
    from med_idefics.tracking import setup_tracking

    names = [name for name in variants or [] if name] or vqa_variants(outputs_dir)  # "" (MLproject default): all
    if not names:
        raise ConfigError(f"no trained VQA variant in {outputs_dir}/: train one first (`dvc repro stage2`)")
    wrong = [name for name in names if not VQA_VARIANT.match(name)]
    if wrong:
        raise ConfigError(f"{wrong}: only VQA variants are registered (single-stage, two-stage, two-stage-n<N>)")
    setup_tracking(params)
    return [register_variant(params, name, Path(outputs_dir), Path(metrics_dir), dvc_stage) for name in names]


def register_variant(params: Params, variant: str, outputs_dir: Path, metrics_dir: Path, dvc_stage=None):
    import mlflow
    from mlflow import MlflowClient

    from med_idefics import serving
    from med_idefics.modeling.adapters import AdapterError, resolve_adapter
    from med_idefics.tracking import tracked_run

    try:
        adapter_dir = resolve_adapter(str(outputs_dir / variant / "adapter"), f"Train {variant} first (`dvc repro`).")
    except AdapterError as err:
        raise ConfigError(str(err)) from err
    training_run = results.run_id_of(adapter_dir.parent)
    config = serving.ServingConfig.from_params(params)
    base_dir = Path(params.model.base_dir)
    tags = {
        "variant": variant,
        "training_run_id": training_run or "none",
        "adapter_sha256": serving.folder_sha256(adapter_dir),
        "package_sha256": serving.package_sha256(base_dir, adapter_dir, config),
        "base": serving.base_reference(base_dir),
        **evaluation_tags(metrics_dir / variant, training_run),
    }
    name, client = params.registry.model_name, MlflowClient()
    description = describe(variant, tags, params)
    same = ("variant", "package_sha256")
    existing = [v for v in _versions(client, name) if all(v.tags.get(k) == tags[k] for k in same)]
    if existing:
        version = str(min(existing, key=lambda v: int(v.version)).version)
        _tag_version(client, name, version, tags, description)
        return Registration(variant, version, False, tags)
    run_tags = {"variant": variant, "training_run_id": training_run or "none"}
    run_name = f"register-{variant}"
    with tempfile.TemporaryDirectory() as staging, tracked_run(params, run_name, run_tags, dvc_stage=dvc_stage):
        package = serving.package(base_dir, adapter_dir, config, Path(staging))
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=serving.VqaModel(),
            artifacts=package.artifacts,
            signature=package.signature,  # no input example: MLflow would load and run the model to check it
            pip_requirements=package.pip_requirements,
            code_paths=[str(Path(serving.__file__).parent)],  # the med_idefics package, as registered
            registered_model_name=name,
        )
        version = str(info.registered_model_version)
        _tag_version(client, name, version, tags, description)
    return Registration(variant, version, True, tags)


def evaluation_tags(variant_metrics: Path, training_run: str | None) -> dict[str, str]:
    """``<suite>.<key>`` for every number in ``<variant_metrics>/<suite>.json`` and ``<suite>.eval_run_id`` (from
    ``run_info.json`` beside them); files whose evaluation run evaluated another training run (a stale evaluation)
    are left out."""
    tags: dict[str, str] = {}
    variant_metrics = Path(variant_metrics)
    try:
        eval_runs = results.read_run_info(variant_metrics).get("eval_runs", {})
    except results.ResultsError as err:
        raise ConfigError(f"{err}; rerun the evaluation of this variant") from err
    for path in sorted(variant_metrics.glob("*.json")):
        if path.name == results.RUN_INFO_FILE:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: unreadable metrics ({err}); rerun the evaluation of this variant") from err
        suite, human = path.stem.removesuffix(results.HUMAN_SUFFIX), path.stem.endswith(results.HUMAN_SUFFIX)
        eval_run = data.get("eval_run_id") if human else eval_runs.get(suite)
        if not _evaluates(eval_run, training_run):
            logger.warning("%s: evaluation run %s evaluated another training run; not attached", path, eval_run)
            continue
        tags[f"{suite}.eval_run_id"] = str(eval_run or "none")
        for key, value in data.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                tags[f"{suite}.{key}"] = repr(value)
    return tags


def _evaluates(eval_run: str | None, training_run: str | None) -> bool:
    """False only when the evaluation run is in the store and names a different training run."""
    if not eval_run or not training_run:
        return True
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        evaluated = MlflowClient().get_run(eval_run).data.tags.get("training_run_id")
    except MlflowException:
        return True
    return evaluated in (None, "none", training_run)


def describe(variant: str, tags: dict[str, str], params: Params) -> str:
    """One line: what the variant is, on which base, and its headline number."""
    sweep = VQA_VARIANT.match(variant).group(2)
    kind = {
        "single-stage": "LoRA trained on VQA from the bare base (the paper's baseline)",
        "two-stage": "LoRA trained on captions (stage 1), then on VQA (stage 2)",
    }.get(variant, f"two-stage LoRA with stage 1 on {sweep} captions")
    suite, metric = params.registry.suite, params.registry.metric
    value = _number(tags.get(f"{suite}.{metric}"))
    if value is None:
        return f"{variant}: {kind}; base {tags['base']}; not evaluated on {suite} yet"
    low, high = _number(tags.get(f"{suite}.{metric}_ci_low")), _number(tags.get(f"{suite}.{metric}_ci_high"))
    ci = f" (95% CI {low:.3f}-{high:.3f})" if low is not None and high is not None else ""
    return f"{variant}: {kind}; base {tags['base']}; {suite} {metric} {value:.3f}{ci}"


def _tag_version(client, name: str, version: str, tags: dict[str, str], description: str) -> None:
    for key, value in tags.items():
        _set_tag(client, name, version, key, value)
    client.update_model_version(name, version, description=redact(description))


def _set_tag(client, name: str, version: str, key: str, value: Any) -> None:
    _retry(client.set_model_version_tag, name, version, key, redact(str(value))[:_TAG_LIMIT])


def _retry(write, *args, attempts: int = 5) -> None:
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


def _versions(client, name: str) -> list:
    return list(client.search_model_versions(f"name = '{name}'"))


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


# --------------------------------------------------------------------------------------------------------------------
# Promotion


@dataclass(frozen=True)
class Candidate:
    version: str
    variant: str
    value: float
    ci_low: float | None
    ci_high: float | None
    eval_run_id: str | None


def candidate(model_version, suite: str, metric: str) -> Candidate | None:
    """The version's evidence on ``suite``/``metric``, or None when it has none (never promoted then)."""
    tags = model_version.tags
    value = _number(tags.get(f"{suite}.{metric}"))
    if value is None:
        return None
    eval_run = tags.get(f"{suite}.eval_run_id")
    return Candidate(str(model_version.version), tags.get("variant", "?"), value,
                     _number(tags.get(f"{suite}.{metric}_ci_low")), _number(tags.get(f"{suite}.{metric}_ci_high")),
                     None if eval_run in (None, "none") else eval_run)  # fmt: skip


def promote(
    params: Params, predictions_dir: Path = PREDICTIONS_DIR, dvc_stage: str | None = None, dry_run: bool = False
) -> dict[str, Any]:
    """Move ``registry.alias`` to the best evaluated version if it beats the champion; returns the decision.

    ``dry_run``: decide and return the decision, but move no alias, write no tag and start no run."""
    import mlflow
    from mlflow import MlflowClient

    from med_idefics.tracking import setup_tracking, tracked_run

    check_selection_suite(params)
    setup_tracking(params)
    client, reg = MlflowClient(), params.registry
    versions = _versions(client, reg.model_name)
    candidates = sorted(filter(None, (candidate(v, reg.suite, reg.metric) for v in versions)), key=_version_number)
    decision = decide(candidates, _alias_target(client, reg.model_name, reg.alias), params, Path(predictions_dir))
    if dry_run:
        return decision | {"dry_run": True, "run_id": None, "champion_after": decision["champion_before"]}
    run_tags = {"model_name": reg.model_name, "alias": reg.alias, "outcome": decision["outcome"]}
    with tracked_run(params, "promote", run_tags, dvc_stage=dvc_stage) as run:
        decision["run_id"] = run.info.run_id if run is not None else None
        if decision["outcome"] == PROMOTED:
            _retry(client.set_registered_model_alias, reg.model_name, reg.alias, decision["chosen"])
        decision["champion_after"] = _alias_target(client, reg.model_name, reg.alias)
        _record(client, reg.model_name, versions, decision)
        if run is not None:
            mlflow.log_dict(decision, "promotion.json")
    return decision


def check_selection_suite(params: Params) -> None:
    """Promotion ranks on ``registry.suite``; the ``validation`` suite exists only when the config carves one."""
    from med_idefics.data.suites import VALIDATION, has_validation

    if params.registry.suite == VALIDATION and not has_validation(params):
        raise ConfigError(
            f"registry.suite is {VALIDATION}, but data.vqa.validation_fraction is 0: there is no validation split to "
            "choose a model on. Set data.vqa.validation_fraction > 0 (e.g. 0.1) and rerun training and evaluation."
        )


def decide(candidates: list[Candidate], champion: str | None, params: Params, predictions_dir: Path) -> dict:
    """The promotion decision as a JSON-able dict: ``outcome`` (promoted, kept, no-candidate), ``chosen`` (the
    version that is or becomes champion, or the challenger that was refused), ``reason`` and the evidence."""
    reg = params.registry
    decision: dict[str, Any] = {
        "model_name": reg.model_name, "alias": reg.alias, "suite": reg.suite, "metric": reg.metric,
        "require_significance": reg.require_significance, "champion_before": champion,
        "candidates": [asdict(c) for c in candidates], "test": None,
    }  # fmt: skip
    if not candidates:
        reason = f"no version has {reg.suite}.{reg.metric}: register evaluated variants first"
        return decision | {"outcome": NO_CANDIDATE, "chosen": champion, "reason": reason}
    best = max(candidates, key=lambda c: (c.value, c.version == champion, -_version_number(c)))
    incumbent = next((c for c in candidates if c.version == champion), None)
    label = f"version {best.version} ({best.variant}) {reg.metric} {best.value:.4f}"
    if champion is None:
        return decision | {"outcome": PROMOTED, "chosen": best.version, "reason": f"no {reg.alias} yet; {label}"}
    if best.version == champion:
        return decision | {"outcome": KEPT, "chosen": champion, "reason": f"{label} is already {reg.alias}"}
    if incumbent is None:
        reason = f"{reg.alias} version {champion} has no {reg.suite}.{reg.metric}; {label}"
        return decision | {"outcome": PROMOTED, "chosen": best.version, "reason": reason}
    test = paired_test(incumbent, best, params, predictions_dir)
    decision["test"] = test
    against = f"{label} beats {reg.alias} version {champion} ({incumbent.value:.4f})"
    if not reg.require_significance:
        return decision | {"outcome": PROMOTED, "chosen": best.version, "reason": against}
    if test.get("significant") is None:
        why = f"{against}, but the paired test was not possible: {test.get('error', 'no paired questions')}"
        return decision | {"outcome": KEPT, "chosen": best.version, "reason": why}
    if not test.get("significant"):
        why = f"{against}, but not significantly ({test.get('test')} p={test.get('p_value')}; 0.05 needed)"
        return decision | {"outcome": KEPT, "chosen": best.version, "reason": why}
    return decision | {"outcome": PROMOTED, "chosen": best.version, "reason": f"{against}, p={test.get('p_value')}"}


def paired_test(incumbent: Candidate, challenger: Candidate, params: Params, predictions_dir: Path) -> dict:
    """:func:`med_idefics.metrics.compare` of the two evaluations' predictions on ``registry.metric`` (McNemar for
    closed accuracy and exact match): ``a``, ``b``, ``diff``, its interval, ``p_value``, ``significant``; or
    ``{"error": why}`` when there is nothing to pair."""
    from med_idefics.metrics import compare
    from med_idefics.predictions import PredictionsError

    suite, metric = params.registry.suite, params.registry.metric
    try:
        rows = [_predictions(c, suite, predictions_dir) for c in (incumbent, challenger)]
        missing = [c.version for c, r in zip((incumbent, challenger), rows, strict=True) if r is None]
        if missing:
            return {"error": f"no {suite} predictions found for version(s) {missing}"}
        result = compare(rows[0], rows[1], seed=params.eval.seed, resamples=params.eval.bootstrap_resamples)
    except PredictionsError as err:
        return {"error": str(err)}
    return result.get(metric) or {"error": f"{metric} has no paired test"}


def _predictions(c: Candidate, suite: str, predictions_dir: Path) -> list[dict] | None:
    """The predictions the candidate's evaluation run logged; the local file only when no run is recorded."""
    from med_idefics.predictions import read_predictions

    if c.eval_run_id:
        import mlflow

        try:
            path = mlflow.artifacts.download_artifacts(run_id=c.eval_run_id, artifact_path=f"predictions/{suite}.jsonl")
        except Exception:  # mlflow raises several types for a missing run or artifact
            return None
        return read_predictions(path)
    local = predictions_dir / c.variant / f"{suite}.jsonl"
    return read_predictions(local) if local.is_file() else None


def _record(client, name: str, versions: list, decision: dict) -> None:
    """``promotion.*`` tags on the chosen version; ``promotion.status`` re-derived on every version that claims it."""
    champion = decision["champion_after"]
    if decision["chosen"] is not None:
        listing = "; ".join(
            f"v{c['version']} {c['variant']} {c['value']:.4f} [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}]"
            for c in decision["candidates"]
        )
        test = decision["test"] or {}
        tags = {
            "promotion.outcome": decision["outcome"], "promotion.reason": decision["reason"],
            "promotion.metric": f"{decision['suite']}.{decision['metric']}",
            "promotion.compared_with": decision["champion_before"] or "none",
            "promotion.p_value": _fmt(test.get("p_value")), "promotion.candidates": listing,
            "promotion.run_id": decision["run_id"] or "none",
        }  # fmt: skip
        for key, value in tags.items():
            _set_tag(client, name, decision["chosen"], key, value)
        if decision["chosen"] != champion:
            _set_tag(client, name, decision["chosen"], "promotion.status", "challenger")
    if champion is not None:
        _set_tag(client, name, champion, "promotion.status", CHAMPION_STATUS)
    for v in versions:
        if v.tags.get("promotion.status") == CHAMPION_STATUS and str(v.version) != champion:
            _set_tag(client, name, v.version, "promotion.status", f"replaced by version {champion}")


def _alias_target(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:  # no such alias, or no such registered model yet
        return None


def _version_number(c: Candidate) -> int:
    return int(c.version)


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"
