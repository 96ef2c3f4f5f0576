"""The ``base`` stage: resolve params ``model.base`` into ``model.base_dir``, which every later stage loads from.

- ``tiny``: build a tiny Idefics2 offline (:mod:`med_idefics.modeling.tiny`; tokenizer trained on the training texts
  only), pretrain it — all parameters, on the general-domain split ``model.pretrain.train_split`` (everyday pictures,
  captions, questions, nonsense, repeat-the-words; no medical image or caption) — and ``save_pretrained`` model and
  processor, with ``pretrain_summary.json`` (eval loss on ``model.pretrain.eval_split`` before/after, train loss
  first/last, steps, seconds, parameter count). Like Idefics2-8b, it answers questions in general and knows medical
  words as text, but has never seen a medical image: stage 1 is where it learns them.
- ``tiny-real-processor``: a tiny random Idefics2 behind Idefics2-8b's real processor
  (:mod:`med_idefics.modeling.realistic`), saved without pretraining: offline checks of sentencepiece and 980 px images.
- a local folder, or a hub id such as ``HuggingFaceM4/idefics2-8b``: write a pointer ``base.json`` (see
  :mod:`med_idefics.modeling.loading`), no copy of the weights. A hub revision is resolved to its commit hash
  (network needed, ``$HF_TOKEN`` if the model is gated) so that the stage output pins exactly one model.

``base_dir`` is replaced as a whole, so no file of an earlier base survives next to a new one.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from med_idefics.config import ConfigError, Params, PretrainConfig
from med_idefics.data.schema import read_records
from med_idefics.modeling.loading import hub_token, write_pointer

TINY = "tiny"
REAL_PROCESSOR = "tiny-real-processor"  # = med_idefics.modeling.realistic.NAME (tested)
SUMMARY_FILE = "pretrain_summary.json"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def build_base(params: Params, base_dir: str | Path | None = None) -> dict[str, Any]:
    """Resolve ``params.model.base`` into ``base_dir`` (default ``params.model.base_dir``); returns what was
    written: the pretraining summary for ``tiny``, else the pointer."""
    out = Path(base_dir or params.model.base_dir)
    base = params.model.base
    with _replacing(out) as staging:
        if base == TINY:
            result = build_tiny_base(params, staging)
        elif base == REAL_PROCESSOR:  # random, not pretrained: for offline checks of the real 8B processor
            from med_idefics.modeling.realistic import save_realistic_base

            result = save_realistic_base(staging, params.seed, params.model.do_image_splitting)
        elif Path(base).is_dir():
            if not (Path(base) / "config.json").is_file():
                raise ConfigError(f"model.base={base!r} is a folder without config.json; point it at a saved model")
            result = {"source": "local", "path": base, "do_image_splitting": params.model.do_image_splitting}
            write_pointer(staging, result)
        elif HUB_ID.fullmatch(base):
            revision = resolve_hub_revision(base, params.model.revision)
            result = {"source": "hub", "id": base, "revision": revision}
            result["do_image_splitting"] = params.model.do_image_splitting
            write_pointer(staging, result)
        else:
            raise ConfigError(
                f"model.base={base!r} is neither `tiny`, `{REAL_PROCESSOR}`, an existing local folder, "
                "nor a hub id like owner/name"
            )
    return result


@contextlib.contextmanager
def _replacing(target: Path):
    """A staging folder next to ``target`` that replaces ``target`` on success and vanishes on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.chmod(0o755)  # mkdtemp's 0700 would make the stage output private
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def resolve_hub_revision(repo_id: str, revision: str | None) -> str:
    """The commit hash of ``revision`` (None: the default branch) of hub model ``repo_id``. Offline
    (``$HF_HUB_OFFLINE``: a compute node without network), the commit the HF cache holds for it, as fetched before."""
    from huggingface_hub import HfApi, constants, snapshot_download

    try:
        if constants.HF_HUB_OFFLINE:
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True)).name
        return HfApi().model_info(repo_id, revision=revision, token=hub_token()).sha
    except Exception as err:  # offline mode, no network, unknown repo or revision, no access: one answer to all
        raise ConfigError(
            f"model.base={repo_id!r} (revision {revision or 'default'}): cannot resolve it on the hub "
            f"({type(err).__name__}: {err}). Check the id and the network, set $HF_TOKEN for a gated model, "
            "or use model.base=tiny to work offline (offline, fetch it first: `huggingface-cli download` on a node "
            "with network)"
        ) from err


def tokenizer_corpus(records: Iterable[dict], extra: Sequence[str] = ()) -> list[str]:
    """The texts the tiny tokenizer learns its words from: questions and answers of the given (training) records,
    plus ``extra`` (the caption prompt and prompt prefix)."""
    texts = [text for text in extra if text]
    for record in records:
        texts += [record["question"], record["answer"]]
    return texts


def build_tiny_base(params: Params, out_dir: Path) -> dict[str, Any]:
    """Build, pretrain and save the tiny base into ``out_dir``; returns the pretraining summary."""
    from med_idefics.modeling.tiny import build_tiny

    data, cfg = params.data, params.model.pretrain
    general = read_records(data.root, cfg.dataset, cfg.train_split)
    validation = read_records(data.root, cfg.dataset, cfg.eval_split)
    # The tokenizer knows every word of the training texts and of the prompts the stages use (no <unk> in them);
    # the whole caption split, since the stage-1 size (and its sweep) must not change the base.
    captions = read_records(data.root, data.captions.dataset, data.captions.train_split)
    vqa_train = read_records(data.root, data.vqa.dataset, data.vqa.train_split)
    prompts = (data.caption_prompt, data.prompt_prefix, params.eval.expert_prompt)
    texts = tokenizer_corpus(general + captions + vqa_train, extra=prompts)
    model, processor = build_tiny(texts, params.model.tiny, params.seed, params.model.do_image_splitting)
    from med_idefics.data.demo import counting_records

    summary = pretrain(model, processor, general, validation, cfg, params.seed, focus=counting_records(general))
    summary["vocab_size"] = len(processor.tokenizer)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def pretrain(
    model,
    processor,
    train_records: Sequence[dict],
    eval_records: Sequence[dict],
    cfg: PretrainConfig,
    seed: int,
    focus: Sequence[dict] = (),
) -> dict[str, Any]:
    """Train every parameter of ``model`` for ``cfg.steps`` steps (loss on the answer tokens only, as in the later
    stages) with the HF Trainer: the first ``cfg.focus_steps`` on the ``focus`` records (a curriculum; none when
    either is empty), the rest on ``train_records``. Images are processed once up front, batches only padded per
    step. Returns losses, steps, seconds and the parameter count.

    Runs with one torch thread (see :func:`_torch_threads`)."""
    from med_idefics.data.collator import VqaCollator
    from med_idefics.modeling.tiny import parameter_count

    if not train_records:
        raise ConfigError(
            f"model.base=tiny needs pretraining records in {cfg.dataset}/{cfg.train_split} (model.pretrain); "
            "none were found: run `med-idefics data demo`"
        )
    focus_steps = min(cfg.focus_steps, cfg.steps - 1) if focus else 0
    started = time.perf_counter()
    collator = VqaCollator(processor)
    train, evals = collator.encode(train_records), collator.encode(eval_records)
    history: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="med-idefics-pretrain-") as scratch, _torch_threads(1):
        phases = [(collator.encode(focus), focus_steps, cfg.warmup_steps)] if focus_steps > 0 else []
        phases.append((train, cfg.steps - focus_steps, min(cfg.warmup_steps, 20) if phases else cfg.warmup_steps))
        before = None
        for index, (records, steps, warmup) in enumerate(phases):
            trainer = _trainer(model, collator, records, steps, warmup, cfg, seed, f"{scratch}/{index}")
            if index == 0:
                before = trainer.evaluate(evals)["eval_loss"] if evals else None
            trainer.train()
            history += trainer.state.log_history
        after = trainer.evaluate(evals)["eval_loss"] if evals else None
    losses = [entry["loss"] for entry in history if "loss" in entry]
    model.eval()
    return {
        "steps": sum(steps for _, steps, _ in phases),
        "focus_steps": focus_steps,
        "batch_size": cfg.batch_size,
        "train_records": len(train_records),
        "focus_records": len(focus) if focus_steps else 0,
        "eval_records": len(eval_records),
        "eval_loss_before": before,
        "eval_loss_after": after,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "seconds": round(time.perf_counter() - started, 1),
        "parameters": parameter_count(model),
    }


def _trainer(model, collator, records, steps: int, warmup: int, cfg: PretrainConfig, seed: int, scratch: str):
    from transformers import Trainer, TrainingArguments

    from med_idefics.modeling.loading import one_device_per_process

    args = TrainingArguments(
        output_dir=scratch,
        max_steps=steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=max(cfg.batch_size, 64),
        learning_rate=cfg.lr,
        warmup_steps=warmup,
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        seed=seed,
        dataloader_num_workers=0,  # batches are only padded: workers would cost more than they save
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    return Trainer(model=model, args=one_device_per_process(args), data_collator=collator.pad, train_dataset=records)


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run with ``n`` intra-op threads, then restore the previous setting. The tiny model's matrices (64-256 wide)
    are too small for a second thread to pay on 2 cores: the full default pretraining took 250 s with one thread and
    338 s with two (the threads wait on each other, and far longer whenever another process holds a core)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
