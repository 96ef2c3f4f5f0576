"""Compiled LoRA training with the vision cache, on CPU: how often dynamo recompiles once training runs.

Run as a script (``python tests/compile_check.py --steps 20``) so that a test can run it under another transformers
(``PYTHONPATH=<folder holding transformers 5.17>``) in a fresh process; prints one JSON object: the transformers
version, and per compiled function (``file:line name``) the recompiles that happened after the first step (the first
step compiles each caller of transformers' shared wrappers once; a recompile later means a guard failed on new
inputs), with each one's guard failure. The tiny Idefics2, the stages' own collator, vision cache, LoRA and
``training_arguments``; records of varying lengths and image shapes, as real data has (batches differ in sequence
length and in patch grid)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

WORDS = ("lesion", "chest", "left", "right", "lung", "liver", "kidney", "mass", "shows", "axial", "ct", "image", "of",
         "the", "with", "a", "no", "small", "large")  # fmt: skip
RECOMPILING = re.compile(r"Recompiling function (\S+) in (\S+)")


class Recompiles(logging.Handler):
    """Collects dynamo's ``recompiles`` log records, with the training step they happened in."""

    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.after_first: dict[str, list[str]] = defaultdict(list)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        found = RECOMPILING.search(message)
        if found and self.step >= 1:
            compile_id = torch._guards.CompileContext.current_compile_id()  # frame/recompile: one entry per frame
            frame = getattr(compile_id, "frame_id", None)
            where = f"{Path(found.group(2)).name} {found.group(1)} (frame {frame})"
            reasons = [line.strip(" -") for line in message.splitlines()[2:4]]
            self.after_first[where].append(f"step {self.step + 1}: " + " | ".join(reasons))


def records(n: int, seed: int = 0) -> list[dict]:
    from med_idefics.data.images import to_png_bytes

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        height, width = int(rng.integers(16, 65)), int(rng.integers(16, 65))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        answer = " ".join(rng.choice(WORDS, int(rng.integers(1, 30))))
        out.append({"id": f"r{i}", "image": to_png_bytes(Image.fromarray(pixels)), "question": "describe the image",
                    "answer": answer})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--eval-steps", type=int, default=5, help="the eval loss every N steps (train/eval switches)")
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend (inductor: minutes on CPU)")
    args = parser.parse_args(argv)

    import transformers
    from transformers import Trainer, TrainerCallback

    from med_idefics.config import load_params
    from med_idefics.data.collator import VqaCollator
    from med_idefics.modeling.lora import add_lora
    from med_idefics.modeling.tiny import build_model, build_processor, build_tokenizer
    from med_idefics.modeling.trainer_support import training_arguments
    from med_idefics.modeling.vision_cache import use_vision_cache

    scratch = Path(tempfile.mkdtemp(prefix="compile-check-"))
    overrides = {"vision_cache.enabled": True, "vision_cache.dir": str(scratch / "cache"),
                 "model.base_dir": str(scratch / "base")}  # fmt: skip
    params = load_params(REPO / "params.yaml", overrides)
    recs = records(args.micro_batch * args.steps)
    processor = build_processor(build_tokenizer([r["answer"] for r in recs] + ["describe the image"],
                                                params.model.tiny.vocab_size), params.model.tiny, False)  # fmt: skip
    model = build_model(processor, params.model.tiny, seed=0)
    model.save_pretrained(scratch / "base")
    processor.save_pretrained(scratch / "base")
    model = add_lora(model, dataclasses.replace(params.lora, dropout=0.0))  # compiled training: no LoRA dropout
    recipe = dataclasses.replace(params.stage2, micro_batch=args.micro_batch, grad_accum=1, max_steps=args.steps,
                                 warmup_steps=0, logging_steps=10**6, eval_steps=args.eval_steps,
                                 eval_batch=args.micro_batch, torch_compile=True)  # fmt: skip
    collator = VqaCollator(processor)
    texts = collator.encode_texts(recs)
    evaluation = collator.encode_texts(records(2 * args.micro_batch, seed=1))
    collator = use_vision_cache(params, model, collator, {"training": texts, "eval": evaluation}, "cpu", recipe)
    assert collator.features is not None, "the vision cache is off: nothing to check"

    handler = Recompiles()
    torch._logging.set_logs(recompiles=True)
    for name in ("torch._dynamo.guards.__recompiles", "torch._dynamo.__recompiles"):
        logging.getLogger(name).addHandler(handler)

    class StepCounter(TrainerCallback):
        def on_step_end(self, *_, **__):
            handler.step += 1

    targs = training_arguments(recipe, scratch / "out", seed=0, run_name="compile-check")
    targs.save_strategy, targs.torch_compile_backend = "no", args.backend
    Trainer(model=model, args=targs, data_collator=collator.collate_texts, train_dataset=texts,
            eval_dataset=evaluation, callbacks=[StepCounter()]).train()  # fmt: skip
    result = {"transformers": transformers.__version__, "torch": torch.__version__, "backend": args.backend,
              "steps": handler.step, "recompiles_after_first_step": dict(handler.after_first),
              "most": max((len(v) for v in handler.after_first.values()), default=0)}  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
