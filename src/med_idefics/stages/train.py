"""Stage: LoRA fine-tuning as a tracked run — stage 1 (captioning), stage 2 (VQA, continuing the stage-1 adapter's
weights), single-stage (VQA from the bare base, the paper's baseline) and blind (single-stage's recipe on blank
images: a variant that cannot see, the control that promotion's image gate must refuse; params ``controls``).

One run = one MLflow run named by its variant and seed, ``two-stage (seed 42)`` (its train and eval splits logged as
dataset inputs; ``variant`` and ``seed`` among its params), HF ``Trainer``
driven entirely by params, checkpoints every ``save_steps`` that a rerun of the same command resumes from, the adapter
saved in PEFT format (adapter only). Beside the adapter: ``train_summary.json`` (numbers only) and
``run_info.json`` (variant, stage, MLflow run id, whether it resumed: :mod:`med_idefics.reporting.results`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from med_idefics.config import ConfigError, Params, StageConfig, precision_label
from med_idefics.data.collator import describe_words
from med_idefics.data.schema import DatasetError, count_records, read_records, records_digest
from med_idefics.data.splits import load_vqa_splits, split_name
from med_idefics.files import folder_sha256, write_json
from med_idefics.modeling.adapters import is_remote, resolve_adapter
from med_idefics.reporting.results import run_id_of, write_run_info

logger = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
SUMMARY_FILE = "train_summary.json"
FINGERPRINT_FILE = "fingerprint.json"
_NOT_FINGERPRINTED = ("eval.", "registry.", "mlflow.", "vision_cache.")  # what cannot change a checkpoint


@dataclass(frozen=True)
class StageSpec:
    section: str  # the params section holding the recipe
    task: str  # "captions" or "vqa": which params.data source it trains on
    variant: str  # the default MLflow run / output name
    continues_adapter: bool
    blank_images: bool = False  # every image replaced by a black one of its size (data.suites.blank_images)


STAGES = {
    "stage1": StageSpec("stage1", "captions", "stage1", continues_adapter=False),
    "stage2": StageSpec("stage2", "vqa", "two-stage", continues_adapter=True),
    "single-stage": StageSpec("single_stage", "vqa", "single-stage", continues_adapter=False),
    "blind": StageSpec("single_stage", "vqa", "blind", continues_adapter=False, blank_images=True),
}


def variant_name(stage: str, train_size: int | None = None) -> str:
    """The run/output name: stage1, two-stage, single-stage; sweep points get ``-n<train_size>``."""
    base = STAGES[stage].variant
    return base if train_size is None else f"{base}-n{train_size}"


@dataclass
class TrainRequest:
    stage: str
    out_dir: Path
    init_adapter: str | None = None  # stage2 only: folder, runs:/…, models:/…
    train_size: int | None = None  # overrides data.<task>.train_size (the sweep)
    variant: str | None = None  # run name; default from the stage (+ "-n<size>" for sweep points)
    dvc_stage: str | None = None


@dataclass
class Prepared:
    """Everything checked and loaded before any training starts."""

    spec: StageSpec
    recipe: StageConfig
    variant: str
    train_records: list[dict]
    eval_records: list[dict]
    init_adapter_dir: Path | None
    collator: Any  # the VqaCollator on the base's processor
    train_texts: list[dict]  # the records above, text-encoded once (collator.encode_texts): each passed its checks
    eval_texts: list[dict]


def prepare(params: Params, request: TrainRequest) -> Prepared:
    """Validate the request against params and data; raise a clear error before any model is loaded."""
    if request.stage not in STAGES:
        raise ConfigError(f"unknown stage {request.stage!r}; choose one of {', '.join(STAGES)}")
    spec = STAGES[request.stage]
    recipe: StageConfig = getattr(params, spec.section)
    source = getattr(params.data, spec.task)
    train_size = request.train_size if request.train_size is not None else source.train_size
    if train_size is not None and train_size <= 0:
        raise ConfigError(f"train size must be > 0, got {train_size}")
    if spec.task == "captions" and request.train_size is not None:
        _check_sweep_size(params, request.train_size)
    base_dir = Path(params.model.base_dir)
    if not (base_dir / "config.json").is_file() and not (base_dir / "base.json").is_file():
        raise ConfigError(f"no base model in {base_dir} (model.base_dir): run `med-idefics base` (or `dvc repro base`)")
    from med_idefics.modeling.loading import require_cuda_for_a_large_base

    require_cuda_for_a_large_base(base_dir)  # before the data is read and the texts encoded
    train_records, eval_records = _records(params, spec.task, train_size)
    if spec.blank_images:
        from med_idefics.data.suites import blank_images

        train_records, eval_records = blank_images(train_records), blank_images(eval_records)
    if not train_records:
        raise ConfigError(f"{source.dataset}/{source.train_split} has no records")
    init_dir = None
    if spec.continues_adapter:
        ref = request.init_adapter or "outputs/stage1/adapter"
        if is_remote(ref):
            from med_idefics.tracking.runs import setup_tracking

            setup_tracking(params)  # runs:/ and models:/ name runs of the configured store, not MLflow's default
        hint = "Run stage 1 first: `med-idefics train stage1` (or `dvc repro stage1`)."
        init_dir = resolve_adapter(ref, missing_hint=hint)
    elif request.init_adapter:
        raise ConfigError(f"--init-adapter is only for stage2; {request.stage} starts from the bare base")
    from med_idefics.data.collator import VqaCollator
    from med_idefics.modeling.loading import load_processor

    collator = VqaCollator(load_processor(params.model.base_dir), prompt_prefix=_prefix(params, spec))
    # Encoded once, here: a bad record fails now, naming it, and each training step only adds images and pads.
    train_texts, eval_texts = collator.encode_texts(train_records), collator.encode_texts(eval_records)
    _check_unknown_words(collator, source, (train_records, train_texts), (eval_records, eval_texts))
    variant = request.variant or variant_name(request.stage, request.train_size)
    return Prepared(spec, recipe, variant, train_records, eval_records, init_dir, collator, train_texts, eval_texts)


def _check_unknown_words(collator, source, train: tuple[list, list], evaluation: tuple[list, list]) -> None:
    """Say, before training, how many records hold words the base's tokenizer turns into ``<unk>`` and which; stop
    when training answers do: the model would learn to answer ``<unk>``."""
    for (records, texts), name, split in (
        (train, "training", source.train_split),
        (evaluation, "eval", source.eval_split),
    ):
        found = collator.unknown_words(records, texts)
        if found.answers and name == "training":
            raise DatasetError(
                f"{len(found.answers)} of {len(records)} training answers of {source.dataset}/{split} hold words the "
                f"base's tokenizer does not know; trained on them the model learns to answer <unk>: "
                f"{describe_words(found.answer_words)} (records {', '.join(found.answers[:5])}). The tiny base knows "
                "the words of the data it was built on: rebuild it on this data (`dvc repro base`, which reads "
                "data.captions and data.vqa), or use a base with a subword tokenizer (tiny-real-processor, a hub id)"
            )
        if found.records:
            logger.warning(
                "%d of %d %s records of %s/%s contain words the base's tokenizer does not know (each becomes "
                "<unk>): %s", found.records, len(records), name, source.dataset, split, describe_words(found.words),
            )  # fmt: skip


def _check_sweep_size(params: Params, size: int) -> None:
    """A stage-1 size at or above the full stage-1 set is two-stage's stage 1 again (same params, data and seed).
    Config validation refuses such a ``sweep.sizes`` against a set ``data.captions.train_size``; for the whole split
    (null) its size is known only here."""
    captions = params.data.captions
    full = captions.train_size
    if full is None:
        full = count_records(params.data.root, captions.dataset, captions.train_split)
    if size >= full:
        raise ConfigError(
            f"sweep.sizes (--train-size) {size}: at or above the full stage-1 size ({full} captions of "
            f"{captions.dataset}/{captions.train_split}) a sweep point is two-stage's stage 1 again; use a size "
            f"below {full}"
        )


def _records(params: Params, task: str, train_size: int | None) -> tuple[list[dict], list[dict]]:
    """(train, eval-loss) records. VQA: the configured split (data.splits); with a validation split, training uses
    train minus validation and the eval loss is monitored on validation instead of test."""
    source = getattr(params.data, task)
    if task == "captions":
        train = read_records(params.data.root, source.dataset, source.train_split, limit=train_size)
        return train, read_records(params.data.root, source.dataset, source.eval_split, limit=source.eval_size)
    splits = load_vqa_splits(params)
    monitor = splits.validation or splits.test
    return splits.train[:train_size], monitor[: source.eval_size]


def train(params: Params, request: TrainRequest) -> dict[str, Any]:
    """Run one training stage; returns the summary written to ``<out_dir>/train_summary.json``."""
    prepared = prepare(params, request)
    from med_idefics.tracking.runs import is_main_process, log_params, seeded_run_name, tracked_run

    tags = {"variant": prepared.variant, "stage": request.stage}
    if prepared.spec.task == "vqa":
        tags["vqa_split"] = split_name(params.data.vqa)
    if prepared.init_adapter_dir is not None:
        tags |= _init_adapter_tags(request.init_adapter or "outputs/stage1/adapter", prepared.init_adapter_dir)
    run_name = seeded_run_name(prepared.variant, params.seed)
    with tracked_run(params, run_name=run_name, tags=tags, dvc_stage=request.dvc_stage) as run:
        if run is not None:
            log_params({"precision": precision_label(params.quantization)}, run.info.run_id)
            _log_inputs(params, prepared.spec)
        summary = _train(params, request, prepared, run)
        if is_main_process() and run is not None:
            _log_outputs(request.out_dir, summary)
    return summary


def _train(params: Params, request: TrainRequest, prepared: Prepared, run) -> dict[str, Any]:
    import torch
    from transformers import Trainer

    from med_idefics.modeling.loading import load_base_model
    from med_idefics.modeling.lora import add_lora
    from med_idefics.modeling.trainer_support import MlflowStepLogger, NonFiniteLossGuard, training_arguments
    from med_idefics.modeling.vision_cache import use_vision_cache

    out_dir = request.out_dir
    checkpoints = out_dir / CHECKPOINT_DIR
    # First: under torchrun this sets up the process group that orders the ranks below.
    args = training_arguments(prepared.recipe, checkpoints, seed=params.seed, run_name=prepared.variant)
    with args.main_process_first(local=False, desc="checkpoint folder"):  # rank 0 prepares it, then the others read
        resume = _prepare_checkpoints(checkpoints, _fingerprint(params, request, prepared))

    torch.manual_seed(params.seed)
    model = load_base_model(params.model.base_dir, params.quantization, params.model.attn_implementation)
    # One preparation for all three stages; stage 2 continues the stage-1 adapter's weights.
    model = add_lora(model, params.lora, prepared.recipe.gradient_checkpointing, prepared.init_adapter_dir)
    # params vision_cache: the frozen encoder's outputs for the splits' images, computed once (on args.device)
    splits = {"training": prepared.train_texts, "eval-loss": prepared.eval_texts}
    collator = use_vision_cache(params, model, prepared.collator, splits, args.device, prepared.recipe)
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=collator.collate_texts,
        train_dataset=prepared.train_texts,
        eval_dataset=prepared.eval_texts or None,
        callbacks=[NonFiniteLossGuard(), MlflowStepLogger(run)],
    )
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    # The Trainer evaluates at the last step itself (eval_strategy "steps"); a trainer.evaluate() here ran it twice.
    final_eval = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), {})

    if trainer.is_world_process_zero():
        _save_adapter(model, out_dir / ADAPTER_DIR)
        summary = _summary(prepared, trainer, result, final_eval, seconds)
        write_json(out_dir / SUMMARY_FILE, summary)
        run_id = run.info.run_id if run is not None else None
        info = {
            "variant": prepared.variant,
            "stage": request.stage,
            "run_id": run_id,
            "resumed_from_checkpoint": resume,
        }
        write_run_info(out_dir, info)
        if run is not None:
            import mlflow

            mlflow.log_dict({"log_history": trainer.state.log_history}, "trainer_log.json", run_id=run.info.run_id)
        shutil.rmtree(checkpoints, ignore_errors=True)  # done: a rerun must start afresh, not resume
        return summary
    return {}


def _prefix(params: Params, spec: StageSpec) -> str:
    # Captioning records carry the caption prompt as their question; the VQA prefix applies to questions only.
    return params.data.prompt_prefix if spec.task == "vqa" else ""


def _fingerprint(params: Params, request: TrainRequest, prepared: Prepared) -> dict[str, Any]:
    """What must be equal for a checkpoint to be resumed rather than discarded: the configuration and the contents
    of what the run reads — the records, the base and the adapter it continues (paths alone would let a rebuilt
    base or regenerated data resume a stale checkpoint)."""
    from med_idefics.modeling.loading import base_digest

    return {
        "stage": request.stage,
        # vision_cache: a speed lever whose losses equal the uncached path's (tests/test_vision_cache.py)
        "params": {k: v for k, v in params.flat().items() if not k.startswith(_NOT_FINGERPRINTED)},
        "train_size": request.train_size,
        "n_train": len(prepared.train_records),
        "data": records_digest(prepared.train_records + prepared.eval_records),
        "base": base_digest(params.model.base_dir),
        "init_adapter": folder_sha256(prepared.init_adapter_dir) if prepared.init_adapter_dir else None,
    }


def _prepare_checkpoints(checkpoints: Path, fingerprint: dict[str, Any]) -> bool:
    """True when ``checkpoints`` holds a resumable checkpoint of this very configuration. Only the main process
    (rank 0 under torchrun) removes a stale folder and writes the fingerprint; the other ranks only read, after it
    (``main_process_first`` in :func:`_train`), so every rank takes the same decision on the same folder."""
    from med_idefics.tracking.runs import is_main_process

    marker = checkpoints / FINGERPRINT_FILE
    has_checkpoint = any(checkpoints.glob("checkpoint-*/trainer_state.json"))
    if has_checkpoint and marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(fingerprint)):
        return True
    if is_main_process():
        shutil.rmtree(checkpoints, ignore_errors=True)
        checkpoints.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
    return False


def _save_adapter(model, target: Path) -> None:
    """Adapter only, PEFT format, written next to the target then renamed: never a half-written adapter."""
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def _summary(prepared, trainer, result, final_eval, seconds) -> dict[str, Any]:
    """Numbers only (a DVC metric); the ids go to ``run_info.json``."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "optimizer_steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "n_train": len(prepared.train_records),
        "n_eval": len(prepared.eval_records),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_loss": result.training_loss,
        "eval_loss": final_eval.get("eval_loss"),
        "train_seconds": round(seconds, 2),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
    }


def _log_inputs(params: Params, spec: StageSpec) -> None:
    from med_idefics.tracking.runs import log_split_inputs

    source = getattr(params.data, spec.task)
    log_split_inputs(params.data.root, [(source.dataset, source.train_split)], "training")
    log_split_inputs(params.data.root, [(source.dataset, source.eval_split)], "validation")


def _log_outputs(out_dir: Path, summary: dict[str, Any]) -> None:
    import mlflow

    mlflow.log_artifacts(str(out_dir / ADAPTER_DIR), artifact_path=ADAPTER_DIR)
    mlflow.log_artifact(str(out_dir / SUMMARY_FILE))
    mlflow.log_metrics({f"final_{k}": v for k, v in summary.items() if isinstance(v, int | float) and v is not None})


def _init_adapter_tags(ref: str, local: Path) -> dict[str, str]:
    tags = {"init_adapter": ref}
    if run_id_of(local.parent):
        tags["stage1_run_id"] = run_id_of(local.parent)
    elif ref.startswith("runs:/"):
        tags["stage1_run_id"] = ref.removeprefix("runs:/").split("/")[0]
    return tags
