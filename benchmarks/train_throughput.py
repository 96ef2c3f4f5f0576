"""Training throughput: samples/s and peak memory of one LoRA training stage, through the stage's own code
(params recipe → ``training_arguments``, ``VqaCollator`` — texts encoded once, images and padding per step —
``add_lora``, HF ``Trainer``).

    python benchmarks/train_throughput.py                        # CPU: the tiny Idefics2 of params model.tiny
    python benchmarks/train_throughput.py --base-dir outputs/base  # the pretrained tiny base
    python benchmarks/train_throughput.py --shape idefics2-8b    # GPU: the Idefics2-8B architecture, random weights
    python benchmarks/train_throughput.py --shape idefics2-8b --qlora  # the same as QLoRA, as the paper trained

``idefics2-8b`` downloads nothing (see eval_throughput.py for the dimensions). ``--qlora`` saves the model (random or
not) to a scratch folder and loads it back through the stages' loader with params ``quantization`` and
``load_in_4bit: true`` — its text side and connector 4-bit nf4, the vision encoder and ``lm_head`` in
``compute_dtype`` (bfloat16 for ``idefics2-8b``) — so the timing includes nothing the stages would not do. For
``idefics2-8b`` that round trip writes 16 GB to the scratch folder (``--scratch``; default: the system's temp dir).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from eval_throughput import idefics2_8b, questions, tiny
from transformers import Trainer

from med_idefics.config import load_params
from med_idefics.data.collator import VqaCollator
from med_idefics.modeling.loading import load_base_model
from med_idefics.modeling.lora import add_lora, trainable_parameters
from med_idefics.modeling.trainer_support import training_arguments


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def quantized(model, processor, quantization, attn_implementation: str, scratch: str | None):
    """``model`` reloaded 4-bit through :func:`med_idefics.modeling.loading.load_base_model`, via a scratch folder."""
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        return load_base_model(folder, quantization, attn_implementation)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("tiny", "idefics2-8b"), default="tiny")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--stage", default="stage2", choices=("stage1", "stage2", "single_stage"))
    parser.add_argument("--base-dir", default=None, help="tiny: a saved base (default: random weights)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps timed (after 3 warm-up steps)")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: the stage's params micro_batch")
    parser.add_argument("--qlora", action="store_true", help="train on a 4-bit nf4 base (QLoRA), as the paper did")
    parser.add_argument("--scratch", default=None, help="--qlora: where the base is saved before its 4-bit reload")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    recipe = getattr(params, args.stage)
    if args.micro_batch:
        recipe = dataclasses.replace(recipe, micro_batch=args.micro_batch)
    if args.shape == "idefics2-8b" and not torch.cuda.is_available():
        sys.exit("--shape idefics2-8b needs a CUDA GPU")
    image_size = 980 if args.shape == "idefics2-8b" else params.model.tiny.image_size
    n = recipe.micro_batch * recipe.grad_accum * (args.steps + 3)
    records = questions(n, image_size, params.data.demo.seed)
    texts = [f"{r['question']} {r['answer']}" for r in records]
    model, processor = idefics2_8b(texts) if args.shape == "idefics2-8b" else tiny(params, args.base_dir, texts)
    if args.qlora:
        compute_dtype = "bfloat16" if args.shape == "idefics2-8b" else params.quantization.compute_dtype
        quantization = dataclasses.replace(params.quantization, load_in_4bit=True, compute_dtype=compute_dtype)
        model = quantized(model, processor, quantization, params.model.attn_implementation, args.scratch)
    model = add_lora(model.train(), params.lora, gradient_checkpointing=recipe.gradient_checkpointing)

    with tempfile.TemporaryDirectory() as scratch:
        targs = training_arguments(dataclasses.replace(recipe, max_steps=3), Path(scratch), params.seed, "bench")
        targs.save_strategy = "no"
        targs.eval_strategy = "no"
        collator = VqaCollator(processor, params.data.prompt_prefix)
        encoded = collator.encode_texts(records)  # as the stages do, before the model trains (not timed)
        Trainer(model=model, args=targs, data_collator=collator.collate_texts, train_dataset=encoded).train()
        targs.max_steps = args.steps
        trainer = Trainer(model=model, args=targs, data_collator=collator.collate_texts, train_dataset=encoded)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started

    samples = args.steps * recipe.micro_batch * recipe.grad_accum
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    four_bit = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    kind = f"QLoRA ({four_bit} 4-bit {quantization.quant_type} layers)" if args.qlora else "LoRA"
    trainable = trainable_parameters(model)
    print(f"{args.shape} {args.stage} {kind} on {device}, {model.dtype}: {trainable:,} trainable parameters")
    print(f"{'steps':>5} {'micro-batch':>11} {'accum':>5} {'seconds':>8} {'samples/s':>9} {'peak GiB':>8}")
    print(
        f"{args.steps:>5} {recipe.micro_batch:>11} {recipe.grad_accum:>5} {seconds:>8.2f} "
        f"{samples / seconds:>9.2f} {peak_memory_gib():>8.2f}"
    )


if __name__ == "__main__":
    main()
