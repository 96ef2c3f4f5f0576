"""Stage: the model registry. Every trained VQA variant becomes a version of ``registry.model_name``; the alias
``registry.alias`` (champion) moves on evidence (:mod:`med_idefics.stages.promote`).

:func:`register` packages ``outputs/<variant>/adapter`` as a :class:`med_idefics.modeling.serving.VqaModel`, logged
in an MLflow run ``register-<variant>`` (the version's source run), and gives the version what reads at a glance:

- a handful of tags (:data:`VERSION_TAGS`): variant, seed, training run, package hash, base, and where it was made;
- the headline metrics of each suite of ``metrics/<variant>/`` (``<suite>/<short>``, 4 decimals) and, on
  ``registry.suite``, ``registry.metric`` with its interval — on the logged model it was registered from, logged
  through the source run (:func:`med_idefics.tracking.registry.log_evidence`), with the evaluation run of each suite
  as the logged model's tag ``<suite>.eval_run_id``; promotion reads them there;
- a Markdown description: the score it is chosen on, what it is, each suite's headline numbers with intervals.

Every score and interval stays in the source run's ``evaluation/`` artifacts (the metrics files and their
``run_info.json``) and in the evaluation runs. A package already registered (same ``package_sha256``) is refreshed
instead of given a new version: its tags, metrics (those that changed), artifacts and description (the promotion's
paragraph kept).

Each version also records where it was made (:func:`med_idefics.tracking.provenance.source_state`: ``git_commit``,
``git_dirty``, ``dvc_exp_name``): registered again, the same package takes the new state when that is a committed one
(an experiment applied and committed), and keeps a committed one it had (a later experiment reproducing it).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from med_idefics.config import ConfigError, Params
from med_idefics.reporting import results
from med_idefics.tracking import registry
from med_idefics.tracking.provenance import NONE, SOURCE_TAGS, source_state, uncommitted

OUTPUTS_DIR = Path("outputs")
METRICS_DIR, PREDICTIONS_DIR = Path(results.METRICS_DIR), Path(results.PREDICTIONS_DIR)
MODEL_ARTIFACT = "model"
# The trained VQA variants; `blind` (params controls) too, so that promotion's image gate is seen refusing it
VQA_VARIANT = re.compile(r"^(single-stage|two-stage|two-stage-n(\d+)|blind)$")
# Every tag register gives a version; promote adds at most five (promotion.status/outcome/rule/p_value/run_id)
VERSION_TAGS = ("variant", "seed", "training_run_id", "package_sha256", "base", *SOURCE_TAGS)
# A version's metrics keep 4 decimals: two scores on the same n < 10,000 questions differ by 1/n > 1e-4, so promotion
# ranks them as unrounded; the registry's pages show 0.7381, not 0.7380952380952381
METRIC_DIGITS = 4

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    variant: str
    version: str
    created: bool  # False: this package was registered before; it was refreshed
    tags: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)  # on the version's logged model
    eval_runs: dict[str, str | None] = field(default_factory=dict)  # suite → evaluation run


@dataclass(frozen=True)
class Evaluation:
    """What a variant's metrics folder holds about the trained adapter: the scores of each suite, the files (human
    grades too), and the evaluation run of each suite. Files of an evaluation of another training run are left out."""

    scores: dict[str, dict]
    files: list[Path]
    eval_runs: dict[str, str | None]


def vqa_variants(outputs_dir: Path = OUTPUTS_DIR) -> list[str]:
    """The trained VQA variants in ``outputs_dir``: single-stage, two-stage, the sweep's two-stage-n<N>, blind."""
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
    from med_idefics.tracking.store import setup_tracking

    names = [name for name in variants or [] if name] or vqa_variants(outputs_dir)  # "" (MLproject default): all
    if not names:
        raise ConfigError(f"no trained VQA variant in {outputs_dir}/: train one first (`dvc repro stage2`)")
    wrong = [name for name in names if not VQA_VARIANT.match(name)]
    if wrong:
        raise ConfigError(f"{wrong}: only VQA variants are registered (single-stage, two-stage, two-stage-n<N>, blind)")
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
        "seed": _seed(training_run, params),
        "training_run_id": training_run or NONE,
        "package_sha256": serving.package_sha256(base_dir, adapter_dir, config),
        "base": serving.base_reference(base_dir),
        **source_state(),
    }
    found = evaluation(metrics_dir / variant, training_run)
    metrics = version_metrics(found.scores, params)
    name, client = params.registry.model_name, MlflowClient()
    same = ("variant", "package_sha256")
    existing = [v for v in registry.versions(client, name)
                if all(v.tags.get(k) == tags[k] for k in same) and registry.logged_model_id(v)]  # fmt: skip
    if existing:
        first = min(existing, key=lambda v: int(v.version))
        made = {k: first.tags.get(k, NONE) for k in SOURCE_TAGS}
        if uncommitted(tags) and not uncommitted(made):  # the same package, made from a commit before: keep that
            tags |= made
        description = registry.with_promotion(describe(variant, tags, found.scores, params),
                                              registry.promotion_paragraph(first.description))  # fmt: skip
        _attach(client, first, first.run_id, registry.logged_model_id(first), tags, found, metrics, description)
        return Registration(variant, str(first.version), False, tags, metrics, found.eval_runs)
    run_tags = {"variant": variant, "training_run_id": training_run or NONE}
    run_name = f"register-{variant}"
    with tempfile.TemporaryDirectory() as staging, tracked_run(params, run_name, run_tags, dvc_stage=dvc_stage) as run:
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
        version = client.get_model_version(name, str(info.registered_model_version))
        description = describe(variant, tags, found.scores, params)
        _attach(client, version, run.info.run_id, info.model_id, tags, found, metrics, description)
    return Registration(variant, str(version.version), True, tags, metrics, found.eval_runs)


def _attach(client, version, run_id: str, model_id: str, tags, found: Evaluation, metrics, description: str) -> None:
    """The full scores as the source run's artifacts, the metrics on the logged model, then the version's tags (a
    registered version's older ones removed) and description."""
    name, number = version.name, str(version.version)
    with tempfile.TemporaryDirectory() as folder:
        for path in found.files:
            shutil.copy(path, Path(folder) / path.name)
        info = {"eval_runs": found.eval_runs, "variant": tags["variant"], "training_run_id": tags["training_run_id"]}
        (Path(folder) / results.RUN_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        client.log_artifacts(run_id, folder, registry.EVALUATION_ARTIFACTS)
    registry.log_evidence(client, run_id, model_id, metrics, found.eval_runs)
    for key, value in tags.items():
        registry.set_version_tag(client, name, number, key, value)
    suites = {*found.scores, *_known_suites()}
    registry.delete_version_tags(client, name, number, registry.legacy_tags(version.tags or {}, suites))
    registry.set_description(client, name, number, description)


def evaluation(variant_metrics: Path, training_run: str | None) -> Evaluation:
    """The scores in ``<variant_metrics>/<suite>.json``, the evaluation runs of ``run_info.json`` beside them; files
    whose evaluation run evaluated another training run (a stale evaluation) are left out."""
    variant_metrics = Path(variant_metrics)
    try:
        eval_runs = results.read_run_info(variant_metrics).get("eval_runs", {})
    except results.ResultsError as err:
        raise ConfigError(f"{err}; rerun the evaluation of this variant") from err
    found = Evaluation({}, [], {})
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
        found.files.append(path)
        if not human:
            found.scores[suite] = data
            found.eval_runs[suite] = eval_run or None
    return found


def version_metrics(scores: dict[str, dict], params: Params) -> dict[str, float]:
    """Each suite's headline metrics (``<suite>/<short>``), and on ``registry.suite`` the metric promotion ranks on
    (``registry.metric``) with its interval."""
    metrics: dict[str, float] = {}
    for suite, data in scores.items():
        metrics |= results.headline(suite, data, digits=METRIC_DIGITS)
    reg = params.registry
    chosen_on = scores.get(reg.suite, {})
    for suffix in ("", *results.CI_SUFFIXES):
        if (value := _finite(chosen_on.get(reg.metric + suffix))) is not None:
            metrics[results.metric_key(reg.suite, reg.metric) + suffix] = round(value, METRIC_DIGITS)
    return metrics


def _finite(value) -> float | None:
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    return float(number) if number is not None and math.isfinite(number) else None


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
    return evaluated in (None, NONE, training_run)


def _seed(training_run: str | None, params: Params) -> str:
    """The seed the training run logged; params' seed (what DVC trained with) when the run is not in this store."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if training_run:
        try:
            return MlflowClient().get_run(training_run).data.params.get("seed") or str(params.seed)
        except MlflowException:
            pass
    return str(params.seed)


def _known_suites() -> tuple[str, ...]:
    from med_idefics.data.suites import KNOWN_SUITES

    return KNOWN_SUITES


KINDS = {
    "single-stage": "LoRA trained on VQA from the bare base (the paper's baseline)",
    "two-stage": "LoRA trained on captions (stage 1), then on VQA (stage 2)",
    "blind": "single-stage's recipe on blank images: a control that cannot see, which promotion must refuse",
}


def describe(variant: str, tags: dict[str, str], scores: dict[str, dict], params: Params) -> str:
    """Markdown. The first line — what the registered model's list of versions shows — names the variant, its seed
    and the score promotion ranks on, with its interval; then what it is and where it came from; then each suite's
    headline numbers with intervals; then where every other number is."""
    reg = params.registry
    short = results.metric_key(reg.suite, reg.metric).split("/", 1)[1]
    chosen_on = scores.get(reg.suite)
    if chosen_on and _finite(chosen_on.get(reg.metric)) is not None:
        first = f"{variant}, seed {tags['seed']}: {reg.suite} {short} {results.fmt_metric(chosen_on, reg.metric)}"
    else:
        first = f"{variant}, seed {tags['seed']}: not evaluated on {reg.suite} yet"
    sweep = VQA_VARIANT.match(variant).group(2)
    kind = KINDS.get(variant, f"two-stage LoRA with stage 1 on {sweep} captions")
    made = uncommitted(tags) or f"made from commit `{tags['git_commit'][:8]}`"
    origin = f"{kind}. Base `{tags['base']}`; training run `{tags['training_run_id']}`; {made}."
    order = [reg.suite, *(s for s in results.ordered(set(scores), _known_suites()) if s != reg.suite)]
    lines = []
    for suite in (s for s in order if s in scores):
        numbers = [f"{name} {results.fmt_metric(scores[suite], metric)}"
                   for name, metric in results.headline_metrics(suite).items() if metric in scores[suite]]  # fmt: skip
        if _finite(scores[suite].get("image_reliance")) is not None:  # a blank suite: what the image was worth
            p = _finite(scores[suite].get("image_reliance_p"))
            reliance = results.fmt_metric(scores[suite], "image_reliance")
            numbers.append(f"image reliance {reliance}" + ("" if p is None else f" (one-sided p {p:.2g})"))
        if numbers:
            lines.append(f"- **{suite}**: " + " · ".join(numbers))
    where = (
        f"Every score and interval: `{registry.EVALUATION_ARTIFACTS}/` in this version's source run "
        f"(`register-{variant}`) and each suite's evaluation run (the source model's `<suite>.eval_run_id`)."
    )
    return "\n\n".join(p for p in (first, origin, "\n".join(lines), where) if p)
