"""Evaluation throughput: answers/s of the evaluate stage's batched greedy generation, batch 1 vs the configured batch.

    python benchmarks/eval_throughput.py                       # CPU: the tiny Idefics2 of params model.tiny
    python benchmarks/eval_throughput.py --base-dir outputs/base  # the same with the pretrained tiny base
    python benchmarks/eval_throughput.py --shape idefics2-8b   # GPU: the Idefics2-8B architecture, random weights

Both shapes run :func:`med_idefics.stages.evaluate.generate_answers` — the code the stage runs — on demo questions and
images. Every answer is forced to exactly ``max_new_tokens`` new tokens (``min_new_tokens``), so each batch size does
the same work whatever the (random) weights say. ``idefics2-8b`` downloads nothing: the real 8B dimensions (SigLIP
so400m vision 1152 x 27 layers, patch 14, 980 px; perceiver 64 latents; Mistral-7B text 4096 x 32 layers, 32 heads / 8
kv heads, MLP 14336, vocabulary 32003) with random bf16 weights, a tokenizer trained on the demo questions (fine for
timing: only sequence lengths matter) and images upscaled to 980 px.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # a progress bar per timed call would garble the table

import torch
from PIL import Image

from med_idefics.config import load_params
from med_idefics.data.demo import vqa_records
from med_idefics.modeling.realistic import idefics2_8b_config
from med_idefics.modeling.tiny import build_tiny, build_tokenizer
from med_idefics.prompts import END_OF_UTTERANCE
from med_idefics.stages.evaluate import generate_answers

IDEFICS2_8B_IMAGE_SIZE = 980


def idefics2_8b(texts: list[str], device: str = "cuda"):
    """(model, processor): the Idefics2-8B architecture with random bf16 weights (``device="meta"``: no memory)."""
    from transformers import Idefics2ForConditionalGeneration, Idefics2Processor
    from transformers.models.idefics2 import Idefics2ImageProcessorPil

    from med_idefics.modeling.tiny import CHAT_TEMPLATE

    tokenizer = build_tokenizer(texts, vocab_size=512)
    image_processor = Idefics2ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": IDEFICS2_8B_IMAGE_SIZE, "shortest_edge": 378}
    )
    processor = Idefics2Processor(image_processor, tokenizer, image_seq_len=64, chat_template=CHAT_TEMPLATE)
    with torch.device(device):
        model = Idefics2ForConditionalGeneration._from_config(idefics2_8b_config(tokenizer), dtype=torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor


def tiny(params, base_dir: str | None, texts: list[str]):
    """(model, processor): the pretrained tiny base from ``base_dir``, else a random one of params model.tiny."""
    if base_dir:
        from med_idefics.modeling.loading import load_base_model, load_processor

        return load_base_model(base_dir, params.quantization).eval(), load_processor(base_dir)
    model, processor = build_tiny(texts, params.model.tiny, seed=params.seed)
    return model.eval(), processor


def questions(n: int, image_size: int, seed: int) -> list[dict]:
    records = vqa_records("test", n // 5 + 1, 64, seed)[:n]  # ~7 questions per image
    if image_size != 64:
        from med_idefics.data.images import image_from_bytes, to_png_bytes

        for record in records:
            image = image_from_bytes(record["image"]).resize((image_size, image_size), Image.BICUBIC)
            record["image"] = to_png_bytes(image)
    return records


def time_batch_size(model, processor, records, batch_size: int, max_new_tokens: int) -> float:
    def run(subset):
        generate_answers(model, processor, subset, "", batch_size, max_new_tokens, min_new_tokens=max_new_tokens)

    run(records[:batch_size])  # warm-up: kernels, caches, allocator
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    run(records)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("tiny", "idefics2-8b"), default="tiny")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base-dir", default=None, help="tiny: a saved base (default: random weights)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated; default: 1 and params eval.batch_size")
    parser.add_argument("-n", "--questions", type=int, default=None, help="default: 4 x the largest batch size")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: params eval.max_new_tokens")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    batch_sizes = [int(b) for b in (args.batch_sizes or f"1,{params.eval.batch_size}").split(",")]
    n = args.questions or 4 * max(batch_sizes)
    max_new_tokens = args.max_new_tokens or params.eval.max_new_tokens
    if args.shape == "idefics2-8b" and not torch.cuda.is_available():
        sys.exit("--shape idefics2-8b needs a CUDA GPU (about 20 GB of memory)")
    image_size = IDEFICS2_8B_IMAGE_SIZE if args.shape == "idefics2-8b" else params.model.tiny.image_size
    records = questions(n, image_size, params.data.demo.seed)
    texts = [f"{r['question']} {r['answer']}" for r in records]
    if args.shape == "idefics2-8b":
        model, processor = idefics2_8b(texts)
    else:
        model, processor = tiny(params, args.base_dir, texts)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.shape} on {device}, {model.dtype}: {len(records)} questions, {max_new_tokens} new tokens each")
    print(f"{'batch':>5} {'seconds':>8} {'answers/s':>10} {'tokens/s':>9} {'speed-up':>8}")
    baseline = None
    for batch_size in batch_sizes:
        seconds = time_batch_size(model, processor, records, batch_size, max_new_tokens)
        rate = len(records) / seconds
        baseline = baseline or rate
        print(f"{batch_size:>5} {seconds:>8.2f} {rate:>10.2f} {rate * max_new_tokens:>9.1f} {rate / baseline:>7.2f}x")


if __name__ == "__main__":
    main()
