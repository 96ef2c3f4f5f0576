"""The vision-feature cache on CPU, side by side: stage-2 training seconds per optimizer step and answers/s, without
and with the cache (warm), on the ``tiny-real-processor`` base — Idefics2-8b's real processor at 980/378 px, tiny
random layers — through the stages' own code (``VqaCollator`` + ``add_lora`` + HF ``Trainer``; ``generate_answers``).

    python benchmarks/feature_cache.py               # the table
    python benchmarks/feature_cache.py --json        # {"train_ratio", "eval_ratio", "max_loss_rel_diff", ...}

Records: real VQA-RAD images and questions from ../shared/realdata/vqa-rad when present (each record its own image,
stored as the importers store it: RGB PNG, at most 2,048 px), else synthetic images of VQA-RAD's sizes (256-2,321 px).
One image per record, as in VQA-RAD's stage 2 where the collator's in-memory cache (~45 processed 980 px images)
rarely holds the next image (315 images). The uncached and the cached runs start from the same LoRA weights and seed:
``max_loss_rel_diff`` compares their per-step training losses, ``answers_identical`` their greedy answers (forced to
``--new-tokens`` tokens, so both do the same work). Timings exclude the first step (start-up) and the cache filling;
they depend on the machine's load (printed), the ratios much less.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
from PIL import Image
from transformers import Trainer, TrainerCallback

from med_idefics.config import QuantizationConfig, load_params
from med_idefics.data.collator import VqaCollator
from med_idefics.data.images import IMPORT_COMPRESS_LEVEL, normalize_image, to_png_bytes
from med_idefics.modeling.bases import REAL_PROCESSOR, build_base
from med_idefics.modeling.generation import generate_answers, load_adapted_model
from med_idefics.modeling.loading import load_processor
from med_idefics.modeling.lora import add_lora
from med_idefics.modeling.trainer_support import training_arguments
from med_idefics.modeling.vision_cache import accept_cached_features, fill, open_store

REPO = Path(__file__).resolve().parent.parent
VQA_RAD = REPO.parent / "shared" / "realdata" / "vqa-rad"
FP32 = QuantizationConfig(load_in_4bit=False, quant_type="nf4", double_quant=True, compute_dtype="float32")


def records(n: int, seed: int = 0) -> tuple[list[dict], str]:
    """``n`` records, each with its own image: real VQA-RAD when available, else synthetic."""
    rows = json.loads((VQA_RAD / "VQA_RAD Dataset Public.json").read_text()) if VQA_RAD.is_dir() else []
    out, seen = [], set()
    for row in rows:
        if row["image_name"] in seen:
            continue
        seen.add(row["image_name"])
        image = normalize_image(VQA_RAD / "VQA_RAD Image Folder" / row["image_name"])
        png = to_png_bytes(image, IMPORT_COMPRESS_LEVEL)
        out.append({"id": str(row["qid"]), "image": png, "question": row["question"], "answer": str(row["answer"])})
        if len(out) == n:
            return out, "real VQA-RAD images"
    rng = np.random.default_rng(seed)
    while len(out) < n:
        side = int(rng.integers(256, 2321))
        smooth = rng.integers(0, 256, (side // 32 + 1, side // 32 + 1), dtype=np.uint8)
        image = Image.fromarray(smooth).resize((side, side), Image.BILINEAR).convert("RGB")
        png = to_png_bytes(image, IMPORT_COMPRESS_LEVEL)
        out.append({"id": f"s{len(out)}", "image": png, "question": "Is there a mass?", "answer": "no"})
    return out, "synthetic images (../shared/realdata/vqa-rad not found)"


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def train(params, base_dir, collator, texts, steps: int, micro_batch: int, scratch: Path, cached: bool):
    """(seconds per optimizer step after the first, per-step losses) of a stage-2 run."""
    model = load_adapted_model(base_dir, None, FP32)
    torch.manual_seed(params.seed)
    model = add_lora(model, params.lora)
    if cached:
        store = open_store(params, model, collator.processor, base_dir)
        assert fill(store, model, collator.processor, [t["image"] for t in texts], "training")  # warm, not timed
        accept_cached_features(model)
        collator = collator.with_features(store)
    recipe = dataclasses.replace(params.stage2, max_steps=steps, micro_batch=micro_batch, grad_accum=1,
                                 logging_steps=1, warmup_steps=0)  # fmt: skip
    args = training_arguments(recipe, scratch / ("cached" if cached else "plain"), params.seed, "bench")
    args.save_strategy, args.eval_strategy = "no", "no"
    clock = StepClock()
    trainer = Trainer(model=model, args=args, data_collator=collator.collate_texts, train_dataset=texts,
                      callbacks=[clock])  # fmt: skip
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1), losses


def answer(params, base_dir, processor, recs, batch: int, tokens: int, store=None) -> tuple[float, list[str]]:
    model = load_adapted_model(base_dir, None, FP32)
    kwargs = {"show_progress": False, "min_new_tokens": tokens, "store": store}
    generate_answers(model, processor, recs[:batch], "", batch, tokens, **kwargs)  # warm-up (not timed)
    started = time.perf_counter()
    answers = generate_answers(model, processor, recs, "", batch, tokens, **kwargs)
    return len(recs) / (time.perf_counter() - started), answers


def run(steps: int, micro_batch: int, questions: int, batch: int, tokens: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="feature-cache-") as tmp:
        scratch = Path(tmp)
        overrides = {"model.base": REAL_PROCESSOR, "vision_cache.enabled": True, "vision_cache.max_gib": 4.0,
                     "vision_cache.dir": str(scratch / "cache"), "model.base_dir": str(scratch / "base")}  # fmt: skip
        params = load_params(REPO / "params.yaml", overrides)
        build_base(params, scratch / "base")
        processor = load_processor(scratch / "base")
        recs, source = records(max(steps * micro_batch, questions))
        collator = VqaCollator(processor)
        texts = collator.encode_texts(recs[: steps * micro_batch])
        plain_step, plain_losses = train(params, scratch / "base", collator, texts, steps, micro_batch, scratch, False)
        cached_step, cached_losses = train(params, scratch / "base", collator, texts, steps, micro_batch, scratch, True)
        model = load_adapted_model(scratch / "base", None, FP32)
        store = open_store(params, model, processor, scratch / "base")
        assert fill(store, model, processor, [r["image"] for r in recs[:questions]], "answering")
        asked = recs[:questions]
        plain_rate, plain_answers = answer(params, scratch / "base", processor, asked, batch, tokens)
        cached_rate, cached_answers = answer(params, scratch / "base", processor, asked, batch, tokens, store)
    diffs = [abs(a - b) / abs(a) for a, b in zip(plain_losses, cached_losses, strict=True)]
    return {
        "train_ratio": round(plain_step / cached_step, 3),
        "eval_ratio": round(cached_rate / plain_rate, 3),
        "max_loss_rel_diff": max(diffs),
        "answers_identical": plain_answers == cached_answers,
        "train_seconds_per_step": {"uncached": round(plain_step, 4), "cached": round(cached_step, 4)},
        "answers_per_second": {"uncached": round(plain_rate, 3), "cached": round(cached_rate, 3)},
        "setting": {
            "records": source,
            "steps": steps,
            "micro_batch": micro_batch,
            "questions": questions,
            "answer_batch": batch,
            "new_tokens": tokens,
            "torch_threads": threads,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "cpus": os.cpu_count(),
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=9, help="optimizer steps (the first is not timed)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--questions", type=int, default=32, help="questions answered, each run")
    parser.add_argument("--batch", type=int, default=8, help="answering batch (params paper: eval.batch_size 8)")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    # with --json, stdout is the JSON alone: the Trainer's log lines go to stderr with its progress bars
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = run(args.steps, args.micro_batch, args.questions, args.batch, args.new_tokens, args.threads)
    if args.json:
        print(json.dumps(result, indent=1))
        return result
    s = result["setting"]
    print(f"tiny-real-processor on CPU ({s['torch_threads']} thread(s), {s['cpus']} cores, load average "
          f"{s['loadavg_before'][0]} → {s['loadavg_after'][0]}), {s['records']}")  # fmt: skip
    train_s, rates = result["train_seconds_per_step"], result["answers_per_second"]
    print(f"{'':<34}{'uncached':>10}{'cached':>10}{'ratio':>8}")
    print(f"{'stage 2: s per optimizer step':<34}{train_s['uncached']:>10.3f}{train_s['cached']:>10.3f}"
          f"{result['train_ratio']:>7.2f}x")  # fmt: skip
    print(f"{'answers/s':<34}{rates['uncached']:>10.2f}{rates['cached']:>10.2f}{result['eval_ratio']:>7.2f}x")
    print(f"max relative loss difference {result['max_loss_rel_diff']:.1e}; "
          f"greedy answers identical: {result['answers_identical']}")  # fmt: skip
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
