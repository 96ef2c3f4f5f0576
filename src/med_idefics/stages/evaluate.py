"""Stage: evaluate one variant — the bare base or a LoRA adapter — on the suites of :mod:`med_idefics.data.suites`.

The model is loaded once per invocation and answers every requested suite by batched greedy generation (left-padded
prompts rendered exactly as in training, stopping at ``<end_of_utterance>``). All variants are evaluated at the same
precision, the training's (:func:`med_idefics.modeling.loading.base_dtype`) — recorded as the run's tag and param
``precision``.

Per suite: predictions ``<predictions_dir>/<variant>/<suite>.jsonl`` (JSONL rows of
:func:`med_idefics.scoring.predictions.write_predictions`), metrics ``<metrics_dir>/<variant>/<suite>.json``
(:func:`med_idefics.scoring.metrics.summarize`, or :func:`~med_idefics.scoring.metrics.summarize_abstention` for
``med-halt``: numbers only), the run ids in ``<metrics_dir>/<variant>/run_info.json``
(:mod:`med_idefics.reporting.results`), and one MLflow run ``eval-<variant>-<suite>`` with the suite's splits as
dataset inputs and the predictions as a table (``predictions.json``: question, answer, prediction, correct). When the
run that made the variant — its training run, or the base's run — is in the store, the evaluation runs nest under it
and it gets the suite's headline metrics as ``<suite>/<metric>`` (with ``_ci_low``/``_ci_high``): one row per variant
in the MLflow runs table. Evaluating again what is already evaluated — the same answers and scores as the files hold,
whose recorded run is in this store (a clone after ``dvc pull``, a forced rerun) — keeps that run and changes no file:
no duplicate run, no new run id for DVC to see. Predictions the tracking store did not take (an outage) are kept
beside the predictions folder until their run has them; the rerun logs them without generating again
(docs/long-runs.md).

A variant is ``base``; a name whose adapter is ``<outputs_dir>/<name>/adapter`` (``outputs/`` unless the request
says; ``single-stage``, ``two-stage``, sweep points such as ``two-stage-n500``); or an adapter reference — anything
containing ``/`` (a folder, ``runs:/…``, ``models:/…``), named in outputs by ``--name`` or else by the reference with
every other character than letters, digits, ``.``, ``_`` and ``-`` turned into ``-`` (``runs:/abc/adapter`` →
``runs-abc-adapter``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from med_idefics.config import ConfigError, Params, precision_label
from med_idefics.data.splits import split_name
from med_idefics.data.suites import BLANKED, MED_HALT, Suite, load_suite, suite_splits
from med_idefics.files import write_json
from med_idefics.modeling.adapters import AdapterError, is_remote, resolve_adapter
from med_idefics.modeling.generation import generate_answers
from med_idefics.prompts import extract_answer
from med_idefics.reporting import results
from med_idefics.scoring.consistency import consistency_scores
from med_idefics.scoring.metrics import PAPER, contains_answer, is_abstention, summarize, summarize_abstention
from med_idefics.scoring.reliance import reliance_scores

logger = logging.getLogger(__name__)
BASE = "base"
PENDING_DIR = ".unlogged-evaluations"  # beside the predictions folder: what an outage kept from its runs
KEPT_PREDICTIONS = "predictions.jsonl"
PREDICTIONS_DIR = Path(results.PREDICTIONS_DIR)
METRICS_DIR = Path(results.METRICS_DIR)
OUTPUTS_DIR = Path("outputs")
PREDICTIONS_TABLE = "predictions.json"  # the MLflow table of every evaluation run: one name, so the UI compares them
_TRAINING_COMMANDS = {
    "single-stage": "`dvc repro single_stage` (or `med-idefics train single-stage`)",
    "two-stage": "`dvc repro stage2` (or `med-idefics train stage2`)",
    "stage1": "`dvc repro stage1` (or `med-idefics train stage1`)",
}
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Target:
    """What is evaluated: ``name`` in outputs and run names; ``adapter`` the reference as given (None = the base)."""

    name: str
    adapter: str | None = None
    adapter_dir: Path | None = None
    training_run_id: str | None = None


@dataclass
class EvalRequest:
    variant: str
    suites: list[str]
    name: str | None = None  # overrides the output name derived from ``variant``
    predictions_dir: Path = PREDICTIONS_DIR
    metrics_dir: Path = METRICS_DIR
    dvc_stage: str | None = None
    outputs_dir: Path = OUTPUTS_DIR  # where a variant name's adapter is: <outputs_dir>/<name>/adapter


@dataclass
class SuiteResult:
    metrics: dict[str, Any]
    predictions_path: Path
    metrics_path: Path
    rows: list[dict]


def is_reference(variant: str) -> bool:
    return is_remote(variant) or "/" in variant or os.sep in variant


def output_name(variant: str) -> str:
    name = _UNSAFE_NAME.sub("-", variant).strip("-.")
    if not name:
        raise ConfigError(f"cannot derive an output name from variant {variant!r}; pass --name")
    return name


def resolve_target(variant: str, name: str | None = None, outputs_dir: Path = OUTPUTS_DIR) -> Target:
    """The variant's adapter folder and training run; a missing adapter raises naming the command that makes it."""
    if name is not None and output_name(name) != name:
        raise ConfigError(f"--name {name!r}: use only letters, digits, '.', '_' and '-'")
    if variant == BASE:
        return Target(name or BASE)
    if is_reference(variant):
        adapter_dir = resolve_adapter(variant)
        return Target(name or output_name(variant), variant, adapter_dir, training_run_of(variant, adapter_dir))
    folder = Path(outputs_dir) / variant / "adapter"
    command = _TRAINING_COMMANDS.get(variant, f"the `med-idefics train` command (or `dvc repro` stage) for {variant}")
    adapter_dir = resolve_adapter(
        str(folder), missing_hint=f"Variant {variant!r} has not been trained: run {command} first."
    )
    return Target(name or output_name(variant), str(folder), adapter_dir, training_run_of(str(folder), adapter_dir))


def training_run_of(reference: str, adapter_dir: Path) -> str | None:
    """The MLflow run that trained the adapter: ``run_id`` of the ``run_info.json`` beside it, else the run of a
    ``runs:/`` URI or of a registered model version; None when nothing says."""
    if results.run_id_of(adapter_dir.parent):
        return results.run_id_of(adapter_dir.parent)
    if reference.startswith("runs:/"):
        return reference.removeprefix("runs:/").split("/")[0] or None
    if reference.startswith("models:/"):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        model = reference.removeprefix("models:/").strip("/")
        try:
            if "@" in model:
                model_name, alias = model.split("@", 1)
                return MlflowClient().get_model_version_by_alias(model_name, alias.split("/")[0]).run_id or None
            model_name, version = [*model.split("/"), ""][:2]
            return MlflowClient().get_model_version(model_name, version).run_id or None
        except MlflowException:
            return None
    return None


def precision_tag(params: Params) -> str:
    return precision_label(params.quantization)


def prediction_rows(suite: Suite, raws: Sequence[str]) -> list[dict]:
    return [
        {
            "id": record["id"],
            "question": record["question"],
            "answer": record["answer"],
            "answer_type": record["answer_type"],
            "prediction": extract_answer(raw),
            "raw_generation": raw,
        }
        for record, raw in zip(suite.records, raws, strict=True)
    ]


def suite_metrics(suite: Suite, rows: Sequence[Mapping], params: Params, sighted: Sequence[Mapping] | None = None):
    """The suite's scores; with its rewording pairs, their consistency; a blank suite's, with the predictions of the
    suite it blanks (``sighted``), its image reliance."""
    seed, resamples = params.eval.seed, params.eval.bootstrap_resamples
    if suite.name == MED_HALT:
        return summarize_abstention(rows, seed=seed, resamples=resamples)
    metrics = summarize(rows, seed=seed, resamples=resamples, mode=PAPER)
    if suite.pairs:
        metrics |= consistency_scores(rows, suite.pairs, seed, resamples)
    if suite.blanks is not None and sighted is not None:
        metrics |= reliance_scores(sighted, rows, seed, resamples)
    return metrics


def blanks_last(suites: Sequence[Suite]) -> list[Suite]:
    """The suites in their order, each blank suite after the one it blanks (its image reliance needs those answers)."""
    return [s for s in suites if s.name not in BLANKED] + [s for s in suites if s.name in BLANKED]


def evaluate(params: Params, request: EvalRequest) -> dict[str, SuiteResult]:
    """Evaluate ``request.variant`` on ``request.suites``; checks data and adapter before loading the model."""
    return evaluate_variants(params, [request])[0]


def evaluate_variants(params: Params, requests: Sequence[EvalRequest]) -> list[dict[str, SuiteResult]]:
    """Evaluate several variants in one process: the base is loaded once and each variant's adapter swapped onto it
    (:class:`~med_idefics.modeling.generation.AdapterSwitch`); every suite and adapter is checked before loading.
    With ``vision_cache.enabled``, each suite's images are encoded once for all variants. A blank suite is scored
    against the suite it blanks when both are asked for (``all`` asks for both): its image reliance."""
    from med_idefics.modeling.generation import AdapterSwitch
    from med_idefics.modeling.loading import load_processor, require_cuda_for_a_large_base
    from med_idefics.modeling.vision_cache import open_store
    from med_idefics.tracking.store import setup_tracking

    require_cuda_for_a_large_base(params.model.base_dir)  # before the suites' images are read
    suites = [blanks_last([load_suite(params, name) for name in request.suites]) for request in requests]
    experiment_id = setup_tracking(params)  # also points MLflow at the store that runs:/ and models:/ refer to
    targets = []
    for request in requests:
        try:
            target = resolve_target(request.variant, request.name, request.outputs_dir)
        except AdapterError as err:
            raise ConfigError(str(err)) from err
        if target.adapter is None:  # the base: its own tracked run (`med-idefics base`) is the row it belongs to
            target = replace(target, training_run_id=results.run_id_of(results.base_run_folder(params.model.base_dir)))
        targets.append(target)
    processor = load_processor(params.model.base_dir)
    switch = AdapterSwitch(params.model.base_dir, params.quantization, params.model.attn_implementation)
    store = open_store(params, switch.model, processor)
    answered = []
    for request, target, variant_suites in zip(requests, targets, suites, strict=True):
        model = switch.use(target.adapter_dir)
        parent = _parent_run(target.training_run_id, experiment_id)
        done: dict[str, SuiteResult] = {}
        for suite in variant_suites:
            sighted = done[suite.blanks].rows if suite.blanks in done else None
            done[suite.name] = evaluate_suite(params, request, target, suite, model, processor, parent, store, sighted)
        answered.append({name: done[name] for name in request.suites})
    return answered


def evaluate_suite(
    params, request, target: Target, suite: Suite, model, processor, parent: str | None, store=None, sighted=None
) -> SuiteResult:
    """One suite: generate and score; then, unless that reproduces the evaluation already recorded (see
    :func:`_reproduces_recorded`), write the two files and log them as one tracked run. ``store``: the vision-feature
    cache, used for the suite when its images fit; ``sighted``: for a blank suite, the answers with the images. The
    predictions are kept aside until their run has them (:mod:`med_idefics.tracking.pending`): when the tracking store
    does not take them, the stage fails saying so, and its rerun logs them without generating again."""
    from mlflow.exceptions import MlflowException

    from med_idefics.scoring.predictions import read_predictions, write_predictions
    from med_idefics.tracking.runs import log_params, tracked_run

    tags = {
        "variant": target.name,
        "suite": suite.name,
        "adapter": target.adapter or "none",
        "training_run_id": target.training_run_id or "none",
        "precision": precision_tag(params),
        "vqa_split": split_name(params.data.vqa),
    }
    pending, fingerprint = _pending(request, target, suite), _fingerprint(params, target, suite, tags)
    kept = pending.load(fingerprint)
    if kept is not None:
        rows = read_predictions(pending.path(KEPT_PREDICTIONS))
        logger.warning(
            "%s: predictions generated before a tracking outage, logged without generating again", pending.folder
        )
    else:
        rows = prediction_rows(suite, _answers(params, target, suite, model, processor, store))
    metrics = suite_metrics(suite, rows, params, sighted)
    where = (target.name, suite.name)
    predictions_path = results.predictions_path(request.predictions_dir, *where)
    metrics_path = results.metrics_path(request.metrics_dir, *where)
    if _reproduces_recorded(request.metrics_dir / target.name, tags, rows, metrics, predictions_path, metrics_path):
        pending.clear()
        return SuiteResult(metrics, predictions_path, metrics_path, rows)
    write_predictions(predictions_path, rows)
    state = {"fingerprint": fingerprint, "eval_run": (kept or {}).get("eval_run")}
    pending.keep(state, {KEPT_PREDICTIONS: predictions_path})
    run_name = f"eval-{target.name}-{suite.name}"
    try:
        with tracked_run(
            params, run_name, tags=tags, parent_run_id=parent, dvc_stage=request.dvc_stage,
            resume_run_id=state["eval_run"],
        ) as run:  # fmt: skip
            if run is not None:
                pending.update(eval_run=run.info.run_id)
                log_params({"precision": tags["precision"]}, run.info.run_id)
            write_json(metrics_path, metrics)
            eval_run = run.info.run_id if run is not None else None
            info = {
                "variant": target.name,
                "training_run_id": target.training_run_id,
                "eval_runs": {suite.name: eval_run},
            }
            results.write_run_info(request.metrics_dir / target.name, info)
            if run is not None:
                from med_idefics.tracking.runs import log_metrics_to, log_split_inputs

                log_split_inputs(params.data.root, suite_splits(params, suite.name), "evaluation")
                _log_results(suite.name, rows, metrics, predictions_path, metrics_path)
                if parent is not None:  # the variant's row in the runs table: its headline numbers as <suite>/<metric>
                    log_metrics_to(parent, results.headline(suite.name, metrics))
    except MlflowException as err:
        from med_idefics.tracking.outbox import TrackingUnavailable, first_line

        why = first_line(err)
        raise TrackingUnavailable(
            f"{target.name}/{suite.name}: the tracking store did not take the evaluation ({why}). "
            f"Its predictions are in {predictions_path}, kept in {pending.folder} until logged: when the store answers "
            "again, run the same command — it logs them without generating again"
        ) from err
    pending.clear()
    return SuiteResult(metrics, predictions_path, metrics_path, rows)


def _answers(params, target: Target, suite: Suite, model, processor, store) -> list[str]:
    from med_idefics.modeling.vision_cache import fill

    batch, workers = params.eval.batch_size, params.eval.dataloader_workers
    images = [record["image"] for record in suite.records]
    cached = store is not None and fill(store, model, processor, images, suite.name, batch, workers)
    return generate_answers(
        model,
        processor,
        suite.records,
        suite.prefix,
        batch,
        params.eval.max_new_tokens,
        description=f"{target.name}/{suite.name}",
        store=store if cached else None,
        workers=workers,
    )


def _pending(request: EvalRequest, target: Target, suite: Suite):
    """Beside the predictions folder, not in it: ``dvc repro`` deletes a stage's outputs before running it."""
    from med_idefics.tracking.pending import PendingLog

    root = Path(request.predictions_dir).parent / PENDING_DIR
    return PendingLog(root / target.name / suite.name, root=root)


def _fingerprint(params: Params, target: Target, suite: Suite, tags: Mapping) -> dict[str, Any]:
    """What made the predictions: the run's tags, the params, the adapter's and the base's contents, the questions."""
    from med_idefics.data.schema import records_digest
    from med_idefics.files import folder_sha256
    from med_idefics.modeling.loading import base_digest

    return {
        "tags": dict(tags),
        "params": {k: v for k, v in params.flat().items() if not k.startswith(("mlflow.", "registry."))},
        "adapter": folder_sha256(target.adapter_dir) if target.adapter_dir else None,
        "base": base_digest(params.model.base_dir),
        "records": records_digest(suite.records),
    }


def _reproduces_recorded(variant_metrics: Path, tags: Mapping, rows, metrics, predictions_path, metrics_path) -> bool:
    """True when the files already hold exactly these answers and scores and the evaluation run recorded beside them
    is in this store, finished, with the same tags (variant, suite, training run, precision, …). Evaluating again
    what a pulled clone already has then changes nothing: a second run would only be a duplicate, and a new run id in
    ``run_info.json`` would make DVC redo every stage downstream (``dvc status`` would no longer be clean)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from med_idefics.scoring.predictions import WRITTEN_FIELDS, PredictionsError, read_predictions

    recorded = results.eval_run_id(variant_metrics.parent, variant_metrics.name, tags["suite"])
    if not recorded or not predictions_path.is_file() or not metrics_path.is_file():
        return False
    try:
        same_rows = read_predictions(predictions_path) == [{k: row[k] for k in WRITTEN_FIELDS} for row in rows]
        same_metrics = results.read_json(metrics_path) == json.loads(json.dumps(metrics))
        run = MlflowClient().get_run(recorded)
    except (PredictionsError, results.ResultsError, MlflowException):
        return False
    same_run = run.info.status == "FINISHED" and run.info.lifecycle_stage == "active"
    same_run = same_run and all(run.data.tags.get(key) == str(value) for key, value in tags.items())
    return same_rows and same_metrics and same_run


def _parent_run(training_run_id: str | None, experiment_id: str) -> str | None:
    """The training run to nest under: only when it is in this store's experiment (and not deleted)."""
    if not training_run_id:
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient().get_run(training_run_id)
    except MlflowException:
        return None
    ok = run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active"
    return training_run_id if ok else None


def _log_results(suite_name: str, rows, metrics: Mapping, predictions_path: Path, metrics_path: Path) -> None:
    import mlflow

    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    mlflow.log_metrics(numbers)
    mlflow.log_artifact(str(predictions_path), artifact_path="predictions")
    mlflow.log_artifact(str(metrics_path), artifact_path="metrics")
    table = {name: [row[name] for row in rows] for name in ("id", "question", "answer", "prediction")}
    # correct: the answer scores as exact match (the paper's way); on med-halt's nonsense questions, it abstains
    if suite_name == MED_HALT:
        table["correct"] = [is_abstention(row["prediction"]) for row in rows]
    else:
        table["correct"] = [contains_answer(row["answer"], row["prediction"], PAPER) for row in rows]
    table["raw_generation"] = [row["raw_generation"] for row in rows]
    mlflow.log_table(data=table, artifact_file=PREDICTIONS_TABLE)
