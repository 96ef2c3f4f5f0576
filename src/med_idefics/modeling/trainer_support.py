"""HF ``Trainer`` plumbing shared by the training stages: arguments from params, and callbacks that log step
metrics to the stage's MLflow run, stop on a non-finite loss, and stop with a checkpoint on a preemption signal."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from med_idefics.config import StageConfig
from med_idefics.modeling.loading import one_device_per_process
from med_idefics.modeling.lora import CHECKPOINTING_KWARGS

# transformers 5.2x calls it activation checkpointing (the old name still works, with a warning); 5.17 — the lent GPU
# machine's — knows only gradient_checkpointing.
_FIELDS = TrainingArguments.__dataclass_fields__
_CHECKPOINTING = "activation_checkpointing" if "activation_checkpointing" in _FIELDS else "gradient_checkpointing"


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; the run is stopped and marked FAILED."""


def resolve_precision(precision: str) -> dict[str, bool]:
    """``auto``: bf16 on a GPU that has it, else fp16 on GPU; fp32 on CPU."""
    on_gpu = torch.cuda.is_available()
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "fp32"
    if precision == "fp16" and not on_gpu:
        raise ValueError("fp16 training needs a GPU; set the stage's precision to auto or fp32 on CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def training_arguments(recipe: StageConfig, output_dir: Path, seed: int, run_name: str) -> TrainingArguments:
    """The Trainer's arguments from a stage's recipe; one device per process
    (:func:`~med_idefics.modeling.loading.one_device_per_process`)."""
    args = TrainingArguments(
        output_dir=str(output_dir),
        run_name=run_name,
        num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.micro_batch,
        per_device_eval_batch_size=recipe.eval_batch,
        gradient_accumulation_steps=recipe.grad_accum,
        learning_rate=recipe.lr,
        weight_decay=recipe.weight_decay,
        warmup_steps=recipe.warmup_steps,
        logging_steps=recipe.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN must reach NonFiniteLossGuard, not be averaged away
        eval_strategy="steps",
        eval_steps=recipe.eval_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=2,
        **{_CHECKPOINTING: recipe.gradient_checkpointing, f"{_CHECKPOINTING}_kwargs": dict(CHECKPOINTING_KWARGS)},
        use_cache=False,  # explicit: training never reuses the KV cache
        seed=seed,
        data_seed=seed,
        report_to=[],  # MLflow logging is ours (MlflowStepLogger): one run per stage, named by variant
        remove_unused_columns=False,
        dataloader_num_workers=recipe.dataloader_workers,
        torch_compile=recipe.torch_compile,
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
        **resolve_precision(recipe.precision),
    )
    return one_device_per_process(args)


class NonFiniteLossGuard(TrainerCallback):
    """Stop at the first logged NaN/inf loss (the Trainer would otherwise keep stepping on garbage)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "eval_loss"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise NonFiniteLoss(f"{key} became {value} at step {state.global_step}; lower the learning rate")


class StopOnPreemption(TrainerCallback):
    """On a preemption signal (:mod:`med_idefics.tracking.preemption`), at the end of the optimizer step under way:
    log, save a checkpoint and stop. Under torchrun every rank stops at the same step when any rank got the signal
    (a collective over the flag at each step end: a byte). ``stopped_at``: the step it stopped at, else None."""

    def __init__(self, request) -> None:
        self.request = request
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if _on_any_rank(self.request.requested, args.device):
            control.should_log = control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step


def _on_any_rank(flag: bool, device) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class MlflowStepLogger(TrainerCallback):
    """Step metrics to the stage's MLflow run through a :class:`~med_idefics.tracking.outbox.MetricSender` (None:
    no run on this rank): train loss, eval loss, learning rate, samples/s."""

    def __init__(self, sender):
        self.sender = sender
        self._last_time: float | None = None
        self._last_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time, self._last_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.sender is None or not state.is_world_process_zero:
            return
        metrics = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, int | float) and math.isfinite(v)}
        if "train_runtime" in metrics:  # the Trainer's closing summary: its mean loss would be a second point on the
            metrics.pop("train_loss", None)  # last step's train_loss curve (the run's mean is final_train_loss)
        now = time.perf_counter()
        if "loss" in metrics and self._last_time is not None and state.global_step > self._last_step:
            samples = (state.global_step - self._last_step) * args.train_batch_size * args.gradient_accumulation_steps
            samples *= args.world_size
            metrics["samples_per_second"] = samples / max(now - self._last_time, 1e-9)
            self._last_time, self._last_step = now, state.global_step
        renamed = {("train_loss" if k == "loss" else k): v for k, v in metrics.items()}
        if renamed:
            self.sender.log(renamed, step=state.global_step)
