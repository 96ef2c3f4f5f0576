"""One prepared run for a GPU lent for a few minutes: what ``med-idefics estimate`` assumes, measured on the exact
Idefics2-8b shape with random weights (built from its config: nothing is downloaded) behind the real Idefics2-8b
processor (980 px, Mistral tokenizer), through the stages' own code (collator, LoRA, Trainer arguments, vision cache,
answering, model loading). Most valuable first; a section starts only while the time budget (``--budget``, default
420 s from the start, the base's build included: the run ends within 8 minutes) holds it and the sections after it
that come before it in value, so a cut run still leaves the most useful numbers:

1. QLoRA as configs/paper.yaml trains (nf4, micro-batch 2 x 8 accumulation, activation checkpointing; ~17 of the
   paper profile's ~19 estimated hours): samples/s, the evaluation forward factor, and the peak memory of a step at
   the median, at four times the median and at the longest caption length (every sequence of the step padded to it:
   a batch's worst case; a step that runs out of memory is recorded as such);
   then 4-bit answering (batch 8, uncached and cached) and QLoRA with the vision cache (stage 2);
2. configs/paper-fast.yaml's recipe (bf16, micro-batch 16, torch.compile, vision cache): samples/s and peaks;
3. bf16 answering at batch 64, uncached and cached; peaks with activation checkpointing (what the memory fit turns on);
4. cold load times (4-bit and bf16), taken where 1 and 2 load the base, after the page cache is dropped where root may.

Training texts: captions whose token counts are drawn from a log-normal (median 25, sigma 0.8: mean ~34 tokens,
~145 characters, the mean length of ROCO's radiology training captions — 12.3 MB over 65,444 rows of
radiologytraindata_cleaned.csv in Visual Med-Alpaca's release, less ids and file names; the tail is assumed), the
longest at the distribution's 99.9th percentile (~300 tokens). Each memory setting is fitted as
``fixed + micro_batch x (per_sample + per_token x tokens)`` over the steps that fit (at least the two shorter ones).

It writes ``--out`` (default ``$OUT/gpu_check.json`` when ``$OUT`` is set, else ``benchmarks/results/gpu_check.json``)
after every section; ``med-idefics estimate`` reads it (:mod:`med_idefics.modeling.measurements`). docs/gpu.md has the
lent machine's exact command: ``make gpu-wheels`` first (the project's pinned transformers, peft, accelerate and
bitsandbytes, and the tokenizer's file, into the ignored ``gpu-check/``). ``--dry-run`` runs every section on the CPU,
tiny layers behind the same processor (``tiny-real-processor``), smaller batches and fewer steps, in a minute or two:
the same code end to end, and every key the estimate reads (its figures say nothing of a GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import resource
import shutil
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

CAPTION = (
    "axial contrast enhanced computed tomography of the abdomen showing a hypodense lesion in the right lobe "
    "of the liver with peripheral enhancement, no biliary dilatation, normal spleen and kidneys, and a small "
    "amount of free fluid in the pelvis; the lung bases are clear. "
)
MEDIAN_CAPTION, SIGMA, LONG_QUANTILE_Z = 25, 0.8, 3.09  # tokens; log-normal; z of the 99.9th percentile
SPM_FILE = "tokenizer.model.v1"
#: Seconds each section is expected to take (GPU, dry run on CPU): a section starts only when it and the reserve
#: for the more valuable ones after it fit in what is left of the budget.
NEEDS = {
    "load": (60, 15),
    "qlora": (60, 40),
    "answers": (30, 15),
    "qlora-cached": (30, 15),
    "fast": (240, 40),
    "checkpointing": (30, 15),
}  # fmt: skip  (GPU: guesses until the first run; "fast" is mostly compiling)


class Report:
    """The JSON written after every section (a run stopped at the lease's limit keeps what it measured), and the
    time budget."""

    def __init__(self, out: Path, seconds: float) -> None:
        self.out, self.started, self.seconds = out, time.monotonic(), seconds
        self.data: dict = {"train": [], "memory": [], "answers": [], "model_load_s": {}, "skipped": []}

    def allows(self, what: str, *sections: str, dry: bool = False) -> bool:
        """True when ``what`` (needing ``sections[0]``) and the reserve ``sections[1:]`` fit in what is left."""
        need = sum(NEEDS[s][dry] for s in sections)
        if time.monotonic() + need <= self.started + self.seconds:
            return True
        self.data["skipped"].append(f"{what}: skipped, {need} s needed and the time budget is spent")
        print(self.data["skipped"][-1], flush=True)
        return False

    def save(self) -> None:
        self.data["work_seconds"] = round(time.monotonic() - self.started, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.data, indent=1) + "\n")


def memory_now(device: str, peak: bool) -> float:
    """GiB: allocated now or at the peak since the last reset on CUDA; on a CPU the process's peak RSS (a dry run's
    memory figures only show that the plumbing works)."""
    if device == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def drop_page_cache() -> bool:
    """Drop the OS page cache so that a load reads the disk (root only; False where it may not)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def release() -> None:
    """Give the memory of dropped models back (the caller drops its references first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------------
# Texts and images


def caption_lengths(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(max(3, round(x))) for x in rng.lognormal(np.log(MEDIAN_CAPTION), SIGMA, n)]


def records(tokenizer, lengths: list[int], side: int, seed: int = 0) -> list[dict]:
    """A record per caption length: its own smooth random ``side`` px image, a caption of that many tokens."""
    rng = np.random.default_rng(seed)
    ids = tokenizer(CAPTION * (1 + max(lengths) // 30), add_special_tokens=False)["input_ids"]
    out = []
    for i, length in enumerate(lengths):
        coarse = rng.integers(0, 256, (side // 40 + 2, side // 40 + 2, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((side, side), Image.BILINEAR)
        out.append({"id": f"g{i}", "image": to_png_bytes(image, 1), "question": "Describe this radiology image.",
                    "answer": tokenizer.decode(ids[:length]).strip()})  # fmt: skip
    return out


def build(shape: str, processor_dir: str | None, device: str):
    """(model on ``device``, bf16 on CUDA, fp32 on a CPU; the real processor)."""
    from transformers import Idefics2ForConditionalGeneration

    from med_idefics.modeling import realistic

    spm = Path(processor_dir) / SPM_FILE if processor_dir else None
    processor = realistic.build_processor(tokenizer=realistic.build_tokenizer(spm))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    config = (realistic.model_config if shape == "tiny-real-processor" else realistic.idefics2_8b_config)(
        processor.tokenizer
    )
    with torch.device(device):
        model = Idefics2ForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model.eval(), processor


# --------------------------------------------------------------------------------------------------------------------
# Training


class InOrder:
    """Builds a Trainer that takes the training texts in the order given (warm-up, timed, then the peak steps)."""

    @staticmethod
    def trainer(**kwargs):
        from torch.utils.data import SequentialSampler
        from transformers import Trainer

        class Ordered(Trainer):
            def _get_train_sampler(self, *args, **kw):
                return SequentialSampler(self.train_dataset)

        return Ordered(**kwargs)


def train_setting(ctx, model, quantization: str, micro_batch: int, grad_accum: int, checkpointing: bool,
                  cache: bool, compiled: bool, rate_steps: int, eval_batch: int | None = None) -> None:  # fmt: skip
    """Untimed and timed optimizer steps on the drawn lengths (samples/s; ``rate_steps`` 0: peaks only), then a
    step padded to each of the median, four times the median and the longest length (peak memory; the longest may run
    out of memory, which ends the setting), then, with ``eval_batch``, the evaluation
    forward factor. Appends rows to the report as it goes."""
    from transformers import TrainerCallback

    from med_idefics.modeling.lora import add_lora
    from med_idefics.modeling.trainer_support import training_arguments

    params, device, per_step = ctx.params, ctx.device, micro_batch * grad_accum
    lora = dataclasses.replace(params.lora, dropout=0.0 if compiled else params.lora.dropout)
    peft_model = add_lora(model, lora, gradient_checkpointing=checkpointing)
    collator = VqaCollator(processor := ctx.processor)
    # not timed: the first step (and, compiled, the second, where dynamo recompiles for the lengths that vary)
    warm = (2 if compiled else 1) if rate_steps else 0
    timed = collator.encode_texts(ctx.drawn[: per_step * (warm + rate_steps)])
    peaks = [collator.encode_texts([record] * per_step) for record in ctx.peak_records]
    texts = timed + [text for step in peaks for text in step]
    if cache:
        store = open_store(params, peft_model, processor, ctx.base_dir)
        fill(store, peft_model, processor, [t["image"] for t in texts], "gpu-check", 16, ctx.workers)
        accept_cached_features(peft_model)
        collator = collator.with_features(store)
    begins, ends, peak_gib = [], [], []

    class Probe(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            begins.append(memory_now(device, peak=False))

        def on_step_end(self, *_, **__):
            if device == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            peak_gib.append(memory_now(device, peak=True))

    recipe = dataclasses.replace(params.stage2, micro_batch=micro_batch, grad_accum=grad_accum, warmup_steps=0,
                                 max_steps=warm + rate_steps + len(peaks), logging_steps=10**6,
                                 eval_batch=eval_batch or 8,
                                 dataloader_workers=ctx.workers, gradient_checkpointing=checkpointing,
                                 torch_compile=compiled)  # fmt: skip
    setting = {"quantization": quantization, "micro_batch": micro_batch, "grad_accum": grad_accum,
               "gradient_checkpointing": checkpointing, "cache": cache, "compiled": compiled}  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        args = training_arguments(recipe, Path(scratch), params.seed, "gpu-check")
        args.save_strategy, args.eval_strategy = "no", "no"
        if compiled and ctx.compile_backend:  # a backend set turns compiling on: only where the setting compiles
            args.torch_compile_backend = ctx.compile_backend
        trainer = InOrder.trainer(model=peft_model, args=args, data_collator=collator.collate_texts,
                                  train_dataset=texts, callbacks=[Probe()])  # fmt: skip
        started = time.perf_counter()
        try:
            trainer.train()
        except torch.OutOfMemoryError as err:
            setting["oom"] = str(err).splitlines()[0][:200]
        if rate_steps and len(ends) >= warm + rate_steps:
            seconds = ends[warm + rate_steps - 1] - ends[warm - 1]
            rate = per_step * rate_steps / seconds
            lengths = [len(t["input_ids"]) for t in timed[per_step * warm :]]
            row = setting | {"samples_per_s": round(rate, 3), "mean_tokens": round(float(np.mean(lengths)), 1),
                             "untimed_steps_s": round(ends[warm - 1] - started, 1)}  # fmt: skip
            if eval_batch and "oom" not in setting:
                row["eval_forward_factor"] = forward_factor(trainer, timed[: eval_batch * 2], rate, device)
                ctx.report.data.setdefault("eval_forward_factor", row["eval_forward_factor"])  # the estimate's
            ctx.report.data["train"].append(row)
            print(json.dumps(row), flush=True)
    ctx.report.data["memory"].append(memory_row(setting, begins, peak_gib, peaks, warm + rate_steps, micro_batch))
    print(json.dumps(ctx.report.data["memory"][-1]), flush=True)
    ctx.report.save()
    peft_model.unload()  # the base back without adapters, for the next setting
    del trainer, peft_model
    release()


def forward_factor(trainer, texts: list[dict], train_rate: float, device: str) -> float:
    """Evaluation samples/s (the Trainer's own evaluation: forward passes, no backward) over training samples/s."""
    trainer.evaluate(eval_dataset=texts[: len(texts) // 2])  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    trainer.evaluate(eval_dataset=texts)
    if device == "cuda":
        torch.cuda.synchronize()
    return round(len(texts) / (time.perf_counter() - started) / train_rate, 2)


def memory_row(setting: dict, begins: list, peak_gib: list, peaks: list, first: int, micro_batch: int) -> dict:
    """``fixed + micro_batch x (per_sample + per_token x tokens)``, least squares over the peak steps that ran
    (``fixed``: the memory allocated as the first began — weights, adapters, optimizer state)."""
    lengths = [len(texts[0]["input_ids"]) for texts in peaks]
    points = [{"tokens": n, "peak_gib": round(peak_gib[first + i], 3)} for i, n in enumerate(lengths)
              if first + i < len(peak_gib)]  # fmt: skip
    row = {k: setting[k] for k in ("quantization", "gradient_checkpointing", "compiled", "cache", "micro_batch")}
    row |= {"points": points} | (
        {"oom": setting["oom"], "oom_tokens": lengths[len(points)]} if "oom" in setting else {}
    )
    if len(points) >= 2 and first < len(begins):
        fixed = begins[first]
        slope, intercept = np.polyfit([p["tokens"] for p in points], [p["peak_gib"] for p in points], 1)
        per_token, per_sample = max(0.0, slope / micro_batch), max(0.0, (intercept - fixed) / micro_batch)
        row |= {"fixed_gib": round(fixed, 3), "gib_per_sample": round(per_sample, 5), "gib_per_token": per_token}
    return row


# --------------------------------------------------------------------------------------------------------------------
# Answering and loading


def answer_rates(ctx, model, quantization: str, batch: int) -> None:
    """answers/s at ``batch``, every answer forced to ``--new-tokens`` tokens; uncached, then from the vision cache."""
    questions = ctx.drawn[: batch * 2]
    kwargs = {"show_progress": False, "min_new_tokens": ctx.new_tokens}
    for cached in (False, True):
        store = None
        if cached:
            store = open_store(ctx.params, model, ctx.processor, ctx.base_dir)
            fill(store, model, ctx.processor, [r["image"] for r in questions], "answering", 16, ctx.workers)
        generate_answers(model, ctx.processor, questions[:batch], "", batch, ctx.new_tokens, store=store, **kwargs)
        if ctx.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        generate_answers(model, ctx.processor, questions, "", batch, ctx.new_tokens, store=store, **kwargs)
        if ctx.device == "cuda":
            torch.cuda.synchronize()
        row = {"quantization": quantization, "batch": batch, "cache": cached, "new_tokens": ctx.new_tokens,
               "answers_per_s": round(len(questions) / (time.perf_counter() - started), 3)}  # fmt: skip
        ctx.report.data["answers"].append(row)
        print(json.dumps(row), flush=True)
    ctx.report.save()


def timed_load(ctx, quantization: str):
    """The saved base as the stages load it (``load_adapted_model``), its time recorded as a cold load."""
    precision = QuantizationConfig(quantization == "4bit", "nf4", True, ctx.compute_dtype)
    release()
    dropped = drop_page_cache() if ctx.device == "cuda" else False
    started = time.perf_counter()
    model = load_adapted_model(ctx.base_dir, None, precision, ctx.params.model.attn_implementation)
    ctx.report.data["model_load_s"][quantization] = round(time.perf_counter() - started, 3)
    ctx.report.data.setdefault("page_cache_dropped", {})[quantization] = dropped
    ctx.report.save()
    return model


# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    params: object
    processor: object
    device: str
    base_dir: Path
    report: Report
    drawn: list[dict]
    peak_records: list[dict]  # the median, four times the median and the longest caption
    workers: int
    new_tokens: int
    compute_dtype: str
    compile_backend: str | None
    dry: bool


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every section on the CPU, tiny layers, < 3 minutes")
    parser.add_argument("--processor", default=None, help=f"a folder holding {SPM_FILE} (make gpu-wheels saves it)")
    parser.add_argument("--save-processor", default=None, help=f"only copy Mistral's {SPM_FILE} there, and stop")
    parser.add_argument("--budget", type=float, default=None, help="seconds from the start (default 420; dry: 600)")
    parser.add_argument("--new-tokens", type=int, default=None, help="answer length (default 64, the paper's; dry: 4)")
    parser.add_argument("--workers", type=int, default=None, help="dataloader workers (default 4, as the profiles)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.save_processor:
        from med_idefics.modeling.realistic import mistral_sentencepiece_file

        Path(args.save_processor).mkdir(parents=True, exist_ok=True)
        shutil.copy(mistral_sentencepiece_file(), Path(args.save_processor) / SPM_FILE)
        return {}
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        parser.error("no CUDA device: run it on a GPU, or --dry-run on a CPU")
    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None
    out = Path(
        args.out or default_out or REPO / ("gpu-check/dry-run.json" if dry else "benchmarks/results/gpu_check.json")
    )
    report = Report(out, args.budget or (600.0 if dry else 420.0))
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    cache = {"vision_cache.enabled": True, "vision_cache.dir": str(scratch / "cache"), "vision_cache.max_gib": 64.0}
    params = load_params(REPO / "params.yaml", cache)
    shape = "tiny-real-processor" if dry else "idefics2-8b"
    model, processor = build(shape, args.processor, device)
    model.save_pretrained(scratch / "base")  # what the loads read, as a stage reads model.base_dir
    processor.save_pretrained(scratch / "base")
    lengths = caption_lengths(64 if dry else 128)
    long_caption = round(float(MEDIAN_CAPTION * np.exp(LONG_QUANTILE_Z * SIGMA)))
    peak_captions = [MEDIAN_CAPTION, 4 * MEDIAN_CAPTION, long_caption]
    texts = records(processor.tokenizer, [*lengths, *peak_captions], 400 if dry else 980)
    ctx = Context(params, processor, device, scratch / "base", report, texts[:-3], texts[-3:],
                  4 if args.workers is None and not dry else args.workers or 0, args.new_tokens or (4 if dry else 64),
                  "float32" if dry else "bfloat16", "aot_eager" if dry else None, dry)  # fmt: skip
    precision = "float32" if dry else "bf16"
    report.data |= header(shape, device, dry, report.seconds, processor, texts, lengths, peak_captions)
    print(f"{shape} on {device}: built and saved in {time.monotonic() - report.started:.0f} s", flush=True)
    del model
    release()
    sections(ctx, precision)
    report.save()
    print(f"{out}: {len(report.data['train'])} training rates, {len(report.data['memory'])} memory settings, "
          f"{len(report.data['answers'])} answer rates; skipped: {report.data['skipped'] or 'nothing'}")  # fmt: skip
    shutil.rmtree(scratch, ignore_errors=True)
    return report.data


def sections(ctx: Context, precision: str) -> None:
    """The sections in order of value; a dry run uses the same settings at smaller batches and fewer steps."""
    report, dry = ctx.report, ctx.dry
    accumulation, fast_batch, answer_batches, steps = (2, 4, (4, 8), 1) if dry else (8, 16, (8, 64), 2)
    if report.allows("QLoRA (4-bit load, then training as the paper profile)", "load", "qlora", dry=dry):
        model = timed_load(ctx, "4bit")
        train_setting(ctx, model, "4bit", 2, accumulation, True, False, False, rate_steps=steps, eval_batch=8)
        if report.allows("4-bit answering", "answers", "load", "fast", dry=dry):
            answer_rates(ctx, model.eval(), "4bit", answer_batches[0])
        if report.allows("QLoRA with the vision cache", "qlora-cached", "load", "fast", dry=dry):
            train_setting(ctx, model, "4bit", 2, accumulation, True, True, False, rate_steps=1)
        del model
        release()
    if report.allows("paper-fast (bf16 load, then micro-batch 16, compiled, cached)", "load", "fast", dry=dry):
        model = timed_load(ctx, precision)
        train_setting(ctx, model, precision, fast_batch, 1, False, True, True, rate_steps=steps)
        if report.allows("bf16 answering", "answers", dry=dry):
            answer_rates(ctx, model.eval(), precision, answer_batches[1])
        if report.allows("bf16 peaks with activation checkpointing", "checkpointing", dry=dry):
            train_setting(ctx, model, precision, fast_batch, 1, True, False, False, rate_steps=0)
        del model
        release()


def header(shape, device, dry, budget, processor, texts, lengths, peak_captions) -> dict:
    import transformers

    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else None
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    for package in ("peft", "accelerate", "bitsandbytes", "tokenizers"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    full = [len(text["input_ids"]) for text in VqaCollator(processor).encode_texts(texts)]
    return {
        "source": f"benchmarks/gpu_check.py{' --dry-run' if dry else ''}, {shape} on {name}",
        "measured_at": datetime.datetime.now(datetime.UTC).date().isoformat(),
        "dry_run": dry, "budget_s": budget,
        "device": {"name": name, "total_gib": round(total, 1) if total else None},
        "versions": versions,
        "lengths": {"captions": "log-normal: median 25 tokens, sigma 0.8 (ROCO's mean length; tail assumed)",
                    "sequence_tokens": {"p50": int(np.percentile(full[:-3], 50)), "max_drawn": max(full[:-3]),
                                        "peak_steps": full[-3:]},
                    "caption_tokens": {"median": MEDIAN_CAPTION, "peak_steps": peak_captions,
                                       "drawn_max": max(lengths)}},
    }  # fmt: skip


if __name__ == "__main__":
    main()
