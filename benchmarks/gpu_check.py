"""One prepared check for a GPU lent for a few minutes: the exact Idefics2-8b shape with random weights (built from
its config: nothing is downloaded) behind the real Idefics2-8b processor (980 px, Mistral tokenizer), through the
stages' own code. It measures, each section skipped with a message when its package is missing or the time budget
(``--budget``, default 420 s of work, so two runs fit a 15-minute lease) is spent:

1. training samples/s and peak GiB, bf16 LoRA (no activation checkpointing, as configs/paper-fast.yaml) and QLoRA
   (4-bit nf4, checkpointing, as configs/paper.yaml; needs bitsandbytes), at micro-batch 2 and 16, vision cache off
   and on; then bf16 + cache + ``lora.dropout`` 0 + torch.compile at 16;
2. answers/s at batch 1 and 64 (greedy, every answer forced to ``--new-tokens`` tokens), uncached and cached;
3. a few stage-2 steps → 64 questions answered → the adapter saved and loaded back through the registered model's
   code (``serving.package`` + ``VqaModel.load_context`` / ``predict``; without mlflow: through
   ``load_adapted_model``, what ``VqaModel.load_context`` calls) → the same 64 answers; the base's load time.

It writes ``--out`` (default ``benchmarks/results/gpu_check.json``), which ``med-idefics estimate`` reads as its rate
table. On the lent machine (torch 2.11, transformers 5.17, no bitsandbytes/mlflow/dvc, no network)::

    # here, once: the real processor needs mistral-common's tokenizer file, which that machine lacks
    .venv/bin/python benchmarks/gpu_check.py --save-processor gpu-check/processor   # gpu-check/ is git-ignored
    # the device run (carry: ["gpu-check"]):
    PYTHONPATH=src python3 benchmarks/gpu_check.py --processor gpu-check/processor --out $OUT/gpu_check.json

then copy the JSON to benchmarks/results/gpu_check.json and commit it. QLoRA and the registered-model path need
bitsandbytes and mlflow wheels carried as /work/.library/device/README.md describes (``pip download`` for Python
3.12, ``carry: [".whl"]``); without them those parts are skipped and say so. The CPU path
(``--shape tiny-real-processor --device cpu``) runs the same code on the tiny random base in seconds (tested).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "src")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from med_idefics.config import QuantizationConfig, load_params  # noqa: E402
from med_idefics.data.collator import VqaCollator  # noqa: E402
from med_idefics.data.images import to_png_bytes  # noqa: E402
from med_idefics.modeling.generation import generate_answers, load_adapted_model  # noqa: E402
from med_idefics.modeling.vision_cache import accept_cached_features, fill, open_store  # noqa: E402
from med_idefics.prompts import extract_answer  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "gpu_check.json"
CAPTION = (
    "axial contrast enhanced computed tomography of the abdomen showing a hypodense lesion in the right lobe "
    "of the liver with peripheral enhancement, no biliary dilatation, normal spleen and kidneys, and a small "
    "amount of free fluid in the pelvis; the lung bases are clear"
)  # fmt: skip  (~150 tokens with the prompt)


class Budget:
    """Sections start only while their estimated need fits; the report is rewritten after each section, so a run
    stopped at the lease's limit still leaves what it measured."""

    def __init__(self, seconds: float, out: str) -> None:
        self.end, self.skipped, self.out = time.monotonic() + seconds, [], Path(out)

    def save(self, report: dict) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(report, indent=1) + "\n")

    def allows(self, what: str, needs: float) -> bool:
        if time.monotonic() + needs <= self.end:
            return True
        self.skipped.append(f"{what}: skipped, the time budget is spent")
        print(self.skipped[-1], flush=True)
        return False


def peak_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def records(n: int, side: int, seed: int = 0) -> list[dict]:
    """``n`` records, each with its own smooth random ``side`` px image and a ~150-token caption."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        coarse = rng.integers(0, 256, (side // 40 + 2, side // 40 + 2, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((side, side), Image.BILINEAR)
        out.append({"id": f"g{i}", "image": to_png_bytes(image, 1), "question": "Describe this image.",
                    "answer": CAPTION})  # fmt: skip
    return out


def build(shape: str, processor_dir: str | None, device: str):
    """(model on ``device`` in bf16 or fp32, processor)."""
    from transformers import AutoTokenizer, Idefics2ForConditionalGeneration

    from med_idefics.modeling import realistic

    tokenizer = AutoTokenizer.from_pretrained(processor_dir) if processor_dir else None
    processor = realistic.build_processor(tokenizer=tokenizer)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if shape == "tiny-real-processor":
        torch.manual_seed(0)
        model = Idefics2ForConditionalGeneration(realistic.model_config(processor.tokenizer))
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
        return model.to(device, dtype).eval(), processor
    with torch.device(device):
        config = realistic.idefics2_8b_config(processor.tokenizer)
        model = Idefics2ForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model.eval(), processor


def train_rate(params, model, processor, recs, micro_batch, cache, compiled, checkpointing, steps, workers, device):
    """(samples/s after 2 warm-up steps, peak GiB) of LoRA training through Trainer + the stage's collator."""
    from transformers import Trainer, TrainerCallback

    from med_idefics.modeling.lora import add_lora
    from med_idefics.modeling.trainer_support import training_arguments

    lora = dataclasses.replace(params.lora, dropout=0.0 if compiled else params.lora.dropout)
    peft_model = add_lora(model, lora, gradient_checkpointing=checkpointing)
    collator = VqaCollator(processor)
    texts = collator.encode_texts(recs[: micro_batch * (steps + 2)])
    if cache:
        store = open_store(params, peft_model, processor, params.model.base_dir)
        fill(store, peft_model, processor, [t["image"] for t in texts], "training", 16, workers)
        accept_cached_features(peft_model)
        collator = collator.with_features(store)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    recipe = dataclasses.replace(params.stage2, micro_batch=micro_batch, grad_accum=1, max_steps=steps + 2,
                                 warmup_steps=0, logging_steps=1000, dataloader_workers=workers,
                                 gradient_checkpointing=checkpointing, torch_compile=compiled)  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        args = training_arguments(recipe, Path(scratch), params.seed, "gpu-check")
        args.save_strategy, args.eval_strategy = "no", "no"
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        Trainer(model=peft_model, args=args, data_collator=collator.collate_texts, train_dataset=texts,
                callbacks=[Clock()]).train()  # fmt: skip
    rate = micro_batch * (len(times) - 2) / (times[-1] - times[1])
    peak = peak_gib(device)
    peft_model.unload()  # the base back without adapters, for the next configuration
    return round(rate, 2), round(peak, 2)


def answers_rate(model, processor, recs, batch, tokens, store=None) -> float:
    kwargs = {"show_progress": False, "min_new_tokens": tokens, "store": store}
    generate_answers(model, processor, recs[:batch], "", batch, tokens, **kwargs)  # warm-up
    started = time.perf_counter()
    generate_answers(model, processor, recs, "", batch, tokens, **kwargs)
    return round(len(recs) / (time.perf_counter() - started), 3)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("idefics2-8b", "tiny-real-processor"), default="idefics2-8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--processor", default=None, help="the real processor's saved tokenizer (default: build it)")
    parser.add_argument("--save-processor", default=None, help="only save the real tokenizer there, and stop")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds of work before sections are skipped")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per training configuration")
    parser.add_argument("--micro-batches", default="2,16")
    parser.add_argument("--answer-batches", default="1,64")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    if args.save_processor:
        from med_idefics.modeling import realistic

        realistic.build_tokenizer().save_pretrained(args.save_processor)
        return {}
    budget, started = Budget(args.budget, args.out), time.monotonic()
    device = args.device
    side = 980 if args.shape == "idefics2-8b" else 400
    micro_batches = [int(b) for b in args.micro_batches.split(",")]
    answer_batches = [int(b) for b in args.answer_batches.split(",")]
    recs = records(max(micro_batches) * (args.steps + 2) + max(answer_batches), side)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    params = load_params(REPO / "params.yaml", {
        "vision_cache.enabled": True, "vision_cache.dir": str(scratch / "cache"), "vision_cache.max_gib": 64.0,
        "model.base_dir": str(scratch / "base")})  # fmt: skip
    model, processor = build(args.shape, args.processor, device)
    model.save_pretrained(scratch / "base")  # the base the QLoRA load and the registered model read
    processor.save_pretrained(scratch / "base")
    built = round(time.monotonic() - started, 1)
    print(f"{args.shape} on {device}: built and saved in {built} s", flush=True)
    report: dict = {"source": f"benchmarks/gpu_check.py, {args.shape} on {describe(device)}", "train": [],
                    "answers": [], "answers_cached": [], "skipped": budget.skipped}  # fmt: skip

    def trained(quantization: str, base, checkpointing: bool, configurations) -> None:
        for micro_batch, cache, compiled in configurations:
            what = f"{quantization} micro-batch {micro_batch} cache {cache} compiled {compiled}"
            if not budget.allows(what, 60 + 180 * compiled):
                continue
            rate, peak = train_rate(params, base, processor, recs, micro_batch, cache, compiled, checkpointing,
                                    args.steps, args.workers, device)  # fmt: skip
            row = {"quantization": quantization, "micro_batch": micro_batch, "cache": cache, "compiled": compiled,
                   "gradient_checkpointing": checkpointing, "samples_per_s": rate, "peak_gib": peak}  # fmt: skip
            report["train"].append(row)
            budget.save(report)
            print(json.dumps(row), flush=True)

    grid = [(mb, cache, False) for mb in micro_batches for cache in (False, True)]
    compiled = [(max(micro_batches), True, True)] if device == "cuda" else []  # inductor on CPU: minutes, no use
    trained("bf16" if model.dtype == torch.bfloat16 else str(model.dtype).removeprefix("torch."), model, False,
            [*grid, *compiled])  # fmt: skip
    model.eval()
    for config in (model.config, model.config.text_config):  # the LoRA preparation turned the KV cache off
        config.use_cache = True
    for batch in answer_batches:
        n = min(len(recs), 8 if batch == 1 else batch)
        if budget.allows(f"answers at batch {batch}", 60):
            report["answers"].append({"batch": batch, "answers_per_s": answers_rate(model, processor, recs[:n], batch,
                                                                                    args.new_tokens)})  # fmt: skip
            store = open_store(params, model, processor, scratch / "base")
            fill(store, model, processor, [r["image"] for r in recs[:n]], "answering", 16, args.workers)
            cached = answers_rate(model, processor, recs[:n], batch, args.new_tokens, store)
            report["answers_cached"].append({"batch": batch, "answers_per_s": cached})
            budget.save(report)
            print(json.dumps(report["answers"][-1]), json.dumps(report["answers_cached"][-1]), flush=True)
    flow(params, model, processor, recs, scratch, args, budget, report)
    del model
    if importlib.util.find_spec("bitsandbytes") is None:
        budget.skipped.append("QLoRA: bitsandbytes is not installed (carry its wheel: see the docstring)")
    elif budget.allows("QLoRA load", 90):
        from med_idefics.modeling.loading import load_base_model

        qlora = QuantizationConfig(load_in_4bit=True, quant_type="nf4", double_quant=True,
                                   compute_dtype="bfloat16" if device == "cuda" else "float32")  # fmt: skip
        trained("4bit", load_base_model(scratch / "base", qlora), True, grid)
    report["work_seconds"] = round(time.monotonic() - started, 1)
    budget.save(report)
    print(f"{args.out}: {len(report['train'])} training rates, {len(report['answers'])} answer rates; "
          f"skipped: {report['skipped'] or 'nothing'}")  # fmt: skip
    return report


def flow(params, model, processor, recs, scratch: Path, args, budget: Budget, report: dict) -> None:
    """Stage-2 steps → 64 answers → adapter saved → loaded back as the registered model loads it → same answers."""
    if not budget.allows("stage 2 → evaluate → registered-model reload", 150):
        return
    from transformers import Trainer

    from med_idefics.modeling.lora import add_lora
    from med_idefics.modeling.trainer_support import training_arguments

    peft_model = add_lora(model, params.lora)
    collator = VqaCollator(processor)
    recipe = dataclasses.replace(params.stage2, micro_batch=2, grad_accum=1, max_steps=3, warmup_steps=0)
    targs = training_arguments(recipe, scratch / "flow", params.seed, "gpu-check-flow")
    targs.save_strategy, targs.eval_strategy = "no", "no"
    Trainer(model=peft_model, args=targs, data_collator=collator.collate_texts,
            train_dataset=collator.encode_texts(recs[:6])).train()  # fmt: skip
    questions = [{"image": r["image"], "question": "Is there a lesion?"} for r in recs[:64]]
    before = [extract_answer(raw) for raw in generate_answers(peft_model.eval(), processor, questions, "", 64, 8,
                                                              show_progress=False)]  # fmt: skip
    peft_model.save_pretrained(scratch / "adapter")
    peft_model.unload()
    started = time.perf_counter()
    if importlib.util.find_spec("mlflow") is None:
        budget.skipped.append("registered model: mlflow is not installed; reloaded through load_adapted_model")
        precision = QuantizationConfig(False, "nf4", True, "bfloat16" if args.device == "cuda" else "float32")
        reloaded = load_adapted_model(scratch / "base", scratch / "adapter", precision)
        report["model_load_s"] = round(time.perf_counter() - started, 1)
        after = [extract_answer(raw) for raw in generate_answers(reloaded, processor, questions, "", 64, 8,
                                                                 show_progress=False)]  # fmt: skip
    else:
        after = registered_answers(params, scratch, questions, args.device, started, report)
    report["flow"] = {"questions": len(questions), "answers_equal_after_reload": before == after,
                      "distinct_answers": len(set(before))}  # fmt: skip
    budget.save(report)
    print(json.dumps(report["flow"]), flush=True)


def registered_answers(params, scratch: Path, questions, device: str, started: float, report: dict) -> list[str]:
    import base64
    from types import SimpleNamespace

    import pandas as pd

    from med_idefics.modeling.serving import ANSWER, ServingConfig, VqaModel, package

    quantization = {"load_in_4bit": False, "quant_type": "nf4", "double_quant": True,
                    "compute_dtype": "bfloat16" if device == "cuda" else "float32"}  # fmt: skip
    config = dataclasses.replace(ServingConfig.from_params(params), batch_size=64, max_new_tokens=8,
                                 quantization=quantization, prompt_prefix="")  # fmt: skip
    packaged = package(scratch / "base", scratch / "adapter", config, scratch / "package")
    served = VqaModel()
    served.load_context(SimpleNamespace(artifacts=packaged.artifacts))
    report["model_load_s"] = round(time.perf_counter() - started, 1)
    frame = pd.DataFrame({"image": [base64.b64encode(q["image"]).decode() for q in questions],
                          "question": [q["question"] for q in questions]})  # fmt: skip
    return list(served.predict(None, frame)[ANSWER])


def describe(device: str) -> str:
    import transformers

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return f"{name}, torch {torch.__version__}, transformers {transformers.__version__}"


if __name__ == "__main__":
    main()
