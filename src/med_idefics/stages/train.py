"""Stage: LoRA fine-tuning as a tracked run — stage 1 (captioning), stage 2 (VQA, continuing the stage-1 adapter's
weights), single-stage (VQA from the bare base, the paper's baseline) and blind (single-stage's recipe on blank
images: a variant that cannot see, the control that promotion's image gate must refuse; params ``controls``).

One run = one MLflow run named by its variant and seed, ``two-stage (seed 42)`` (its train and eval splits logged as
dataset inputs; ``variant`` and ``seed`` among its params), HF ``Trainer`` driven entirely by params, the adapter
saved in PEFT format (adapter only). Beside the adapter: ``train_summary.json`` (numbers only) and
``run_info.json`` (variant, stage, MLflow run id, whether it resumed: :mod:`med_idefics.reporting.results`).

Long runs (docs/long-runs.md): free disk is checked before training; checkpoints every ``save_steps`` are written
aside and renamed into place when complete (:mod:`med_idefics.modeling.checkpoints`), and a rerun of the same command
resumes from the newest complete one, its run tagged with the run and step it continues. SIGTERM or SIGUSR1 (a
scheduler's preemption, a time limit) saves a checkpoint at the current step, ends the run KILLED and exits 75
(:mod:`med_idefics.tracking.preemption`). Step metrics reach MLflow from a background sender that rides out a
tracking-server outage (:mod:`med_idefics.tracking.outbox`); an adapter trained while the server stays away is kept
until its run has it, and the rerun logs it without training again.
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
from med_idefics.reporting.results import RUN_INFO_FILE, run_id_of, write_run_info

logger = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
SUMMARY_FILE = "train_summary.json"
PENDING_DIR = ".unlogged"  # a trained adapter until its run has it (tracking.pending): what an outage leaves
_NOT_FINGERPRINTED = (
    "eval.",
    "registry.",
    "mlflow.",
    "vision_cache.",
    "memory.",
    "cluster.",
)  # cannot change a checkpoint


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
            from med_idefics.tracking.store import setup_tracking

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
    """Run one training stage; returns the summary written to ``<out_dir>/train_summary.json``. A preemption signal
    ends it with :class:`~med_idefics.tracking.preemption.Preempted` (exit status 75) after a checkpoint; a rerun
    resumes from the newest complete checkpoint, or only logs an adapter whose logging an outage stopped."""
    prepared = prepare(params, request)
    from med_idefics.tracking.preemption import PreemptionRequest

    preemption = PreemptionRequest()
    with preemption.catching():  # from here on SIGTERM/SIGUSR1 only ask to stop at a step's end
        return _run(params, request, prepared, preemption)


def _run(params: Params, request: TrainRequest, prepared: Prepared, preemption) -> dict[str, Any]:
    import torch

    from med_idefics.modeling.checkpoints import check_free_space, prepare_folder, scan, space_needed
    from med_idefics.modeling.loading import load_base_model
    from med_idefics.modeling.lora import add_lora
    from med_idefics.modeling.trainer_support import training_arguments
    from med_idefics.tracking.outbox import send_outbox
    from med_idefics.tracking.preemption import Preempted, mark_resumed, resumed_tags
    from med_idefics.tracking.runs import is_main_process, log_params, seeded_run_name, tracked_run

    out_dir, checkpoints = request.out_dir, request.out_dir / CHECKPOINT_DIR
    fingerprint = _fingerprint(params, request, prepared)
    tags = {"variant": prepared.variant, "stage": request.stage}
    if prepared.spec.task == "vqa":
        tags["vqa_split"] = split_name(params.data.vqa)
    if prepared.init_adapter_dir is not None:
        tags |= _init_adapter_tags(request.init_adapter or "outputs/stage1/adapter", prepared.init_adapter_dir)
    run_name = seeded_run_name(prepared.variant, params.seed)

    recipe, fitted = fit_memory(params, prepared)  # the recipe as it runs on this GPU (params memory)
    # First: under torchrun this sets up the process group that orders the ranks below.
    args = training_arguments(recipe, checkpoints, seed=params.seed, run_name=prepared.variant)
    with args.main_process_first(local=False, desc="checkpoint folder"):  # rank 0 prepares it, then the others read
        if is_main_process():
            send_outbox(out_dir, params)  # what an outage kept from earlier runs of this stage, before anything else
        kept = _pending(out_dir).load(fingerprint) if is_main_process() else _pending(out_dir).peek()
        resume = None if kept else prepare_folder(checkpoints, fingerprint, is_main_process())
    if kept is not None:  # trained already; only its logging was cut short
        return _log_kept(params, request, kept, tags, run_name) if is_main_process() else {}

    torch.manual_seed(params.seed)
    model = load_base_model(params.model.base_dir, params.quantization, params.model.attn_implementation)
    # One preparation for all three stages; stage 2 continues the stage-1 adapter's weights.
    model = add_lora(model, params.lora, recipe.gradient_checkpointing, prepared.init_adapter_dir)
    need = space_needed(model, args.save_total_limit, existing=len(scan(checkpoints)[0]))
    if is_main_process():
        check_free_space(checkpoints, need)
    if preemption.requested:  # before the first step: nothing new to save
        raise Preempted(preemption.signal_name, resume.step if resume else 0, str(resume.path) if resume else None)

    if resume is not None:
        tags |= resumed_tags(resume.run_id, resume.step, str(resume.path))
    with tracked_run(params, run_name, tags=tags, dvc_stage=request.dvc_stage, catch_sigterm=False) as run:
        if run is not None:
            log_params({"precision": precision_label(params.quantization)}, run.info.run_id)
            if fitted:
                log_params({"memory.fitted": fitted}, run.info.run_id)
            _log_inputs(params, prepared.spec)
            if resume is not None and resume.run_id:
                mark_resumed(resume.run_id, run.info.run_id)
        summary = _train(
            params, request, prepared, run, _Setup(args, model, recipe, resume, need.checkpoint, preemption)
        )
    if summary:
        _pending(out_dir).clear()  # its run has everything: a rerun trains afresh
    return summary


@dataclass
class _Setup:
    args: Any  # TrainingArguments
    model: Any
    recipe: StageConfig  # the stage's recipe as fitted to this GPU (fit_memory)
    resume: Any  # the Checkpoint resumed from, or None
    checkpoint_bytes: int
    preemption: Any  # PreemptionRequest


def _train(params: Params, request: TrainRequest, prepared: Prepared, run, setup: _Setup) -> dict[str, Any]:
    """Train, save and log, the run's step metrics going through a sender that rides out an outage; whatever stops
    it, what the sender could not send is kept for the rerun (:mod:`med_idefics.tracking.outbox`)."""
    from med_idefics.tracking.outbox import MetricSender, Outbox, TrackingUnavailable, keep_unsent
    from med_idefics.tracking.preemption import Preempted

    run_id = run.info.run_id if run is not None else None
    sender = MetricSender(run_id) if run_id else None
    try:
        return _fit(params, request, prepared, run_id, setup, sender)
    except (Preempted, TrackingUnavailable):
        raise  # they closed the sender and kept what it did not send
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        keep_unsent(sender, Outbox(request.out_dir), status=status, error=err)
        raise


def _fit(params, request: TrainRequest, prepared: Prepared, run_id, setup: _Setup, sender) -> dict[str, Any]:
    from med_idefics.modeling.checkpoints import AtomicCheckpointTrainer
    from med_idefics.modeling.trainer_support import MlflowStepLogger, NonFiniteLossGuard, StopOnPreemption
    from med_idefics.modeling.vision_cache import use_vision_cache
    from med_idefics.tracking.outbox import Outbox, end_preempted_run
    from med_idefics.tracking.preemption import Preempted

    out_dir, checkpoints = request.out_dir, request.out_dir / CHECKPOINT_DIR
    # params vision_cache: the frozen encoder's outputs for the splits' images, computed once (on args.device)
    splits = {"training": prepared.train_texts, "eval-loss": prepared.eval_texts}
    collator = use_vision_cache(params, setup.model, prepared.collator, splits, setup.args.device, setup.recipe)
    stopper = StopOnPreemption(setup.preemption)
    trainer = AtomicCheckpointTrainer(
        model=setup.model,
        args=setup.args,
        data_collator=collator.collate_texts,
        train_dataset=prepared.train_texts,
        eval_dataset=prepared.eval_texts or None,
        callbacks=[NonFiniteLossGuard(), MlflowStepLogger(sender), stopper],
        run_id=run_id,
        checkpoint_bytes=setup.checkpoint_bytes,
    )
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(setup.resume.path) if setup.resume else None)
    seconds = time.perf_counter() - started
    step = trainer.state.global_step
    if stopper.stopped_at is not None and step < trainer.state.max_steps:  # (a signal at the last step: finished)
        signal_name = setup.preemption.signal_name or "a signal to another rank"
        preempted = Preempted(signal_name, step, str(checkpoints / f"checkpoint-{step}"))
        logger.warning("%s", preempted)
        if sender is not None:
            end_preempted_run(preempted, sender, Outbox(out_dir))
        raise preempted
    if not trainer.is_world_process_zero():
        return {}
    # The Trainer evaluates at the last step itself (eval_strategy "steps"); a trainer.evaluate() here ran it twice.
    final_eval = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), {})
    _save_adapter(setup.model, out_dir / ADAPTER_DIR)
    summary = _summary(prepared, trainer, result, final_eval, seconds, setup.resume)
    write_json(out_dir / SUMMARY_FILE, summary)
    info = {"variant": prepared.variant, "stage": request.stage, "run_id": run_id}
    write_run_info(out_dir, info | {"resumed_from_checkpoint": setup.resume is not None})
    log_history = trainer.state.log_history
    if run_id is not None:  # kept until its run has it all: an outage now must not cost the training
        files = {name: out_dir / name for name in (ADAPTER_DIR, SUMMARY_FILE, RUN_INFO_FILE)}
        state = {"run_id": run_id, "fingerprint": _fingerprint(params, request, prepared), "log_history": log_history}
        _pending(out_dir).keep(state, files)
    shutil.rmtree(checkpoints, ignore_errors=True)  # done: a rerun must start afresh, not resume
    if run_id is not None:
        _log_trained(run_id, out_dir, summary, log_history, sender)
    return summary


def _pending(out_dir: Path):
    from med_idefics.tracking.pending import PendingLog

    return PendingLog(out_dir / PENDING_DIR)


def _log_trained(run_id: str, out_dir: Path, summary: dict, log_history: list, sender) -> None:
    """Log the finished training into its run; TrackingUnavailable when the store does not take it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from med_idefics.tracking.outbox import Outbox, TrackingUnavailable, first_line
    from med_idefics.tracking.provenance import redact

    unsent = sender.close() if sender is not None else []  # one more attempt, as long as the client's retries take
    if unsent:
        Outbox(out_dir).keep(run_id, unsent)
    try:
        if unsent:
            raise MlflowException(f"{len(unsent)} step metrics did not reach it")
        mlflow.log_dict({"log_history": log_history}, "trainer_log.json", run_id=run_id)
        _log_outputs(out_dir, summary)
    except MlflowException as err:
        raise TrackingUnavailable(
            f"training finished, but the tracking store {redact(mlflow.get_tracking_uri())} did not take run "
            f"{run_id}'s results ({first_line(err)}). The adapter is in {out_dir / ADAPTER_DIR}, kept in "
            f"{out_dir / PENDING_DIR} until logged: when the store answers again, run the same command — it logs "
            "them into that run without training again"
        ) from err


def _log_kept(params: Params, request: TrainRequest, kept: dict, tags: dict, run_name: str) -> dict[str, Any]:
    """The rerun after an outage: put the kept adapter back (``dvc repro`` deletes a stage's outputs before running
    it) and log it into the run that trained it, reopened; no training."""
    from med_idefics.tracking.runs import tracked_run

    out_dir, pending = request.out_dir, _pending(request.out_dir)
    for name in (ADAPTER_DIR, SUMMARY_FILE, RUN_INFO_FILE):
        pending.restore(name, out_dir / name)
    summary = json.loads((out_dir / SUMMARY_FILE).read_text())
    logger.warning(
        "%s holds the adapter of run %s, trained already: logging it into that run, without training again",
        pending.folder, kept["run_id"],
    )  # fmt: skip
    with tracked_run(params, run_name, tags=tags, dvc_stage=request.dvc_stage, resume_run_id=kept["run_id"]) as run:
        if run.info.run_id != kept["run_id"]:  # that run is gone from the store: this new one holds the adapter
            write_run_info(out_dir, {"run_id": run.info.run_id})
        _log_trained(run.info.run_id, out_dir, summary, kept["log_history"], sender=None)
    pending.clear()
    return summary


def fit_memory(params: Params, prepared: Prepared) -> tuple[StageConfig, str | None]:
    """The stage's recipe as it runs on this process's GPU, and what was changed to fit (run param ``memory.fitted``)
    or None: its peak predicted from the measured memory per token (benchmarks/results/gpu_check.json) and the
    longest training sequence; where it would not fit and params ``memory.fit`` is on, split micro-batch and/or
    activation checkpointing (the same examples per optimizer step); where it is off, a warning. On a CPU, or with
    nothing measured, the recipe as params give it. Not fingerprinted (``memory.``) nor a DVC dependency: the
    optimizer steps stay the same."""
    from med_idefics.modeling.measurements import fit_recipe, gpu_memory_gib, load_rates, quantization_label

    card = gpu_memory_gib()
    if card is None or not prepared.train_texts:
        return prepared.recipe, None
    tokens = max(len(text["input_ids"]) for text in prepared.train_texts)
    fit = fit_recipe(load_rates(), prepared.recipe, quantization_label(params.quantization),
                     params.vision_cache.enabled, tokens, card, params.memory.headroom_gib, params.memory.fit,
                     stage=prepared.spec.section)  # fmt: skip
    if fit.peak_gib is not None:
        logger.info("%s: predicted peak %.1f GiB of %.1f (%s)", prepared.spec.section, fit.peak_gib, card, fit.origin)
    if fit.note:
        logger.warning("%s", fit.note)
    return fit.apply(prepared.recipe), (fit.note if fit.changed else None)


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


def _save_adapter(model, target: Path) -> None:
    """Adapter only, PEFT format, written next to the target then renamed: never a half-written adapter. A full disk
    is a DiskSpaceError; the checkpoints are still there, so the rerun resumes at the last step and saves it again."""
    from med_idefics.files import DiskSpaceError
    from med_idefics.modeling.checkpoints import is_disk_full

    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(str(staging))
    except Exception as err:
        adapter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        full = is_disk_full(err, target.parent, adapter_bytes)
        shutil.rmtree(staging, ignore_errors=True)
        if full:
            raise DiskSpaceError(
                f"the disk of {target.parent} filled while saving the adapter: free space there and run the same "
                "command again (it resumes from the last checkpoint)"
            ) from err
        raise
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def _summary(prepared, trainer, result, final_eval, seconds, resume) -> dict[str, Any]:
    """Numbers only (a DVC metric); the ids go to ``run_info.json``. ``train_loss`` is the whole training's mean
    loss, a resumed one's too (the Trainer's own covers the steps of its last call only)."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    train_loss = result.training_loss
    if resume is not None:
        # a logged loss is the mean over the steps since the one logged before it
        history = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
        total, last = 0.0, 0
        for step, loss in [(step, loss) for step, loss in history if step <= resume.step]:
            total, last = total + loss * (step - last), step
        after = trainer.state.global_step - resume.step
        train_loss = (total + result.training_loss * after) / max(last + after, 1)
    return {
        "optimizer_steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "n_train": len(prepared.train_records),
        "n_eval": len(prepared.eval_records),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_loss": train_loss,
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
