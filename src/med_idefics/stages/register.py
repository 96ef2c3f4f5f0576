"""Stage: the model registry. Every trained VQA variant becomes a version of ``registry.model_name``; the alias
``registry.alias`` (champion) moves on evidence (:mod:`med_idefics.stages.promote`).

:func:`register` packages ``outputs/<variant>/adapter`` as a :class:`med_idefics.modeling.serving.VqaModel` (logged in
an MLflow run ``register-<variant>``) and tags the version with its variant, training run, package hash and the numbers
of ``metrics/<variant>/<suite>.json`` (``<suite>.<metric>``) and the evaluation runs of
``metrics/<variant>/run_info.json`` (``<suite>.eval_run_id``). A package already registered
(same ``package_sha256``) gets its tags refreshed instead of a new version.

Each version also records where it was made (:func:`med_idefics.tracking.provenance.source_state`: ``git_commit``,
``git_dirty``, ``dvc_exp_name``): registered again, the same package takes the new state when that is a committed one
(an experiment applied and committed), and keeps a committed one it had (a later experiment reproducing it).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from med_idefics.config import ConfigError, Params
from med_idefics.reporting import results
from med_idefics.tracking.provenance import NONE, SOURCE_TAGS, redact, source_state, uncommitted
from med_idefics.tracking.registry import number, set_version_tag, versions

OUTPUTS_DIR = Path("outputs")
METRICS_DIR, PREDICTIONS_DIR = Path(results.METRICS_DIR), Path(results.PREDICTIONS_DIR)
MODEL_ARTIFACT = "model"
VQA_VARIANT = re.compile(r"^(single-stage|two-stage|two-stage-n(\d+))$")

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
    from med_idefics.tracking.runs import setup_tracking

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

    import med_idefics
    from med_idefics.modeling import serving
    from med_idefics.modeling.adapters import AdapterError, resolve_adapter
    from med_idefics.tracking.runs import tracked_run

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
        **source_state(),
        **evaluation_tags(metrics_dir / variant, training_run),
    }
    name, client = params.registry.model_name, MlflowClient()
    description = describe(variant, tags, params)
    same = ("variant", "package_sha256")
    existing = [v for v in versions(client, name) if all(v.tags.get(k) == tags[k] for k in same)]
    if existing:
        first = min(existing, key=lambda v: int(v.version))
        made = {k: first.tags.get(k, NONE) for k in SOURCE_TAGS}
        if uncommitted(tags) and not uncommitted(made):  # the same package, made from a commit before: keep that
            tags |= made
        _tag_version(client, name, str(first.version), tags, description)
        return Registration(variant, str(first.version), False, tags)
    run_tags = {"variant": variant, "training_run_id": training_run or "none"}
    run_name = f"register-{variant}"
    with tempfile.TemporaryDirectory() as staging, tracked_run(params, run_name, run_tags, dvc_stage=dvc_stage):
        package = serving.package(base_dir, adapter_dir, config, Path(staging))
        with warnings.catch_warnings():  # MLflow advises an input example: left out on purpose
            warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=serving.VqaModel(),
                artifacts=package.artifacts,
                signature=package.signature,  # no input example: MLflow would load and run the model to check it
                pip_requirements=package.pip_requirements,
                code_paths=[str(Path(med_idefics.__file__).parent)],  # the med_idefics package, as registered
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
    value = number(tags.get(f"{suite}.{metric}"))
    if value is None:
        return f"{variant}: {kind}; base {tags['base']}; not evaluated on {suite} yet"
    low, high = number(tags.get(f"{suite}.{metric}_ci_low")), number(tags.get(f"{suite}.{metric}_ci_high"))
    ci = f" (95% CI {low:.3f}-{high:.3f})" if low is not None and high is not None else ""
    return f"{variant}: {kind}; base {tags['base']}; {suite} {metric} {value:.3f}{ci}"


def _tag_version(client, name: str, version: str, tags: dict[str, str], description: str) -> None:
    for key, value in tags.items():
        set_version_tag(client, name, version, key, value)
    client.update_model_version(name, version, description=redact(description))
