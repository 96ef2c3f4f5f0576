"""What ``dvc repro`` costs under the current params, before anyone spends a GPU-day: per pipeline stage, its training
samples (examples x epochs), in-training evaluation forward passes, generated answers and model loads, the hours they
take, and each training stage's peak GPU memory.

Figures: :func:`med_idefics.modeling.measurements.load_rates` — ``benchmarks/results/gpu_check.json`` of the
repository (written by ``benchmarks/gpu_check.py`` on a GPU; or any file given as ``--rates``) over issue 17's
reference rates and the assumptions; every figure used is printed with its origin (measured where and when, the
reference, or assumed). A training rate is looked up by quantization, activation checkpointing, vision cache,
torch.compile and micro-batch (log-log interpolation between measured micro-batches, the nearest outside them);
answers/s by quantization, cache and batch size alike, cached where ``vision_cache`` is on and the evaluation's
images fit. An in-training evaluation forward pass is counted at ``eval_forward_factor`` x the training rate, a model
load at ``model_load_s`` of its precision.

Memory: a training stage's peak from the measured memory per token and the longest training sequence its split's
import counted (:mod:`med_idefics.data.token_lengths`), against the measured card (or ``--gpu-gib``); with
``memory.fit`` (paper-fast) a stage that would not fit is shown as it will run — micro-batch split or activation
checkpointing on (:func:`~med_idefics.modeling.measurements.fit_recipe`) — at that recipe's rate.

Sizes: a split's record count from ``data/`` when it is imported, else :data:`RELEASED_SIZES` (the released datasets;
ROCO's from its hub card, not verified here). A VQA validation carve-out counts as ``validation_fraction`` of train's
questions (it is drawn by image: the real count differs by a few).
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from med_idefics.config import ConfigError, Params, StageConfig
from med_idefics.data.token_lengths import read_lengths
from med_idefics.modeling.measurements import (
    MemoryFit,
    answer_rate,
    figure,
    fit_recipe,
    load_rates,
    quantization_label,
    train_rate,
)

IDEFICS2_8B_IMAGE_BYTES = (980 // 14) ** 2 * 1152 * 2  # 4,900 patches x 1,152 wide, bf16: ~11 MB per image

#: Record counts of the released datasets (``data.*`` dataset, split) for splits not imported yet.
RELEASED_SIZES = {
    ("roco", "train"): 65_000,  # ~65k radiology captions (eltorio/ROCO-radiology; not verified offline)
    ("roco", "validation"): 8_000,  # ~8k (likewise)
    ("vqa-rad", "train"): 1_797,  # official release: freeform + para (../shared/realdata)
    ("vqa-rad", "test"): 451,  # test_freeform + test_para
    ("path-vqa", "test"): 6_761,
    ("med-halt", "reasoning_fake"): 1_858,
}
RELEASED_IMAGES = {("vqa-rad", "train"): 314, ("vqa-rad", "test"): 203, ("path-vqa", "test"): 858}


@dataclass
class StageCost:
    name: str
    train_samples: int = 0
    eval_samples: int = 0
    answers: int = 0
    loads: int = 0
    optimizer_steps: int = 0
    hours: float = 0.0
    vision_cache: bool = False
    peak_gib: float | None = None  # the training step's predicted peak (None: not predicted; see notes)
    recipe: str = ""  # micro-batch x accumulation as it runs, "+ckpt" with activation checkpointing
    duplicate_of: str | None = None
    notes: list[str] = field(default_factory=list)


class Figures:
    """Every rate, factor and time the estimate used, with what it rests on (first use wins)."""

    def __init__(self) -> None:
        self.used: dict[str, tuple[str, str]] = {}

    def add(self, name: str, value: str, origin: str) -> None:
        self.used.setdefault(name, (value, origin))

    def rows(self) -> list[dict[str, str]]:
        return [{"figure": name, "value": value, "origin": origin} for name, (value, origin) in self.used.items()]


class Sizes:
    """Split sizes: imported data when present, else the released datasets' (noted once)."""

    def __init__(self, params: Params) -> None:
        self.root = Path(params.data.root)
        self.assumed: set[str] = set()

    def records(self, dataset: str, split: str) -> int:
        from med_idefics.data.schema import count_records, split_path

        if split_path(self.root, dataset, split).is_file():
            return count_records(self.root, dataset, split)
        if (dataset, split) not in RELEASED_SIZES:
            raise ValueError(f"{dataset}/{split} is neither imported under {self.root} nor a released size known here")
        self.assumed.add(f"{dataset}/{split}")
        return RELEASED_SIZES[(dataset, split)]

    def images(self, dataset: str, split: str) -> int:
        return RELEASED_IMAGES.get((dataset, split)) or self.records(dataset, split)


def _fits(params: Params, images: int) -> bool:
    cfg = params.vision_cache
    return cfg.enabled and images * IDEFICS2_8B_IMAGE_BYTES <= cfg.max_gib * 2**30


@dataclass
class Context:
    params: Params
    rates: dict
    figures: Figures
    card_gib: float | None


def training(ctx: Context, name: str, recipe: StageConfig, n: int, n_eval: int, images: int, lengths: tuple[str, str]):
    """A training stage's cost; ``lengths``: the (dataset, split) whose counted token lengths bound its batches."""
    params, rates = ctx.params, ctx.rates
    quantization = quantization_label(params.quantization)
    cost = StageCost(name, loads=1, vision_cache=_fits(params, images))
    stats = read_lengths(params.data.root, *lengths)
    tokens = stats["max"] if stats else None
    try:
        fit = fit_recipe(rates, recipe, quantization, cost.vision_cache, tokens, ctx.card_gib,
                         params.memory.headroom_gib, params.memory.fit, name)  # fmt: skip
    except ConfigError as err:  # nothing fits: the estimate reports it, the stage itself will refuse to start
        fit = MemoryFit(recipe.micro_batch, recipe.grad_accum, recipe.gradient_checkpointing, note=str(err))
        cost.notes.append(str(err))
    where = "/".join(lengths)
    if tokens is None:
        ctx.figures.add(f"longest sequence {where}", "not counted", "import the split to count it")
    else:
        ctx.figures.add(f"longest sequence {where}", f"{tokens:,} tokens", f"counted at import: {stats['tokenizer']}")
    run = fit.apply(recipe)
    cost.peak_gib = fit.peak_gib
    cost.recipe = f"{run.micro_batch}x{run.grad_accum}" + ("+ckpt" if run.gradient_checkpointing else "")
    memory = f"memory {quantization}{' ckpt' if run.gradient_checkpointing else ''}"
    if fit.peak_gib is not None:
        ctx.figures.add(memory, "GiB per token and sample", fit.origin)
        cost.notes += [fit.note] if fit.note else []
    elif tokens is not None:
        ctx.figures.add(memory, "not measured", fit.note)
    per_epoch = math.ceil(math.ceil(n / run.micro_batch) / run.grad_accum)
    cost.optimizer_steps = run.max_steps if run.max_steps > 0 else math.ceil(per_epoch * run.epochs)
    cost.train_samples = cost.optimizer_steps * run.micro_batch * run.grad_accum
    evaluations = cost.optimizer_steps // run.eval_steps + 1  # every eval_steps, and the final one
    cost.eval_samples = evaluations * n_eval if n_eval else 0
    rate, note, origin = train_rate(rates, quantization, run.micro_batch, cost.vision_cache, run.torch_compile,
                                    run.gradient_checkpointing)  # fmt: skip
    setting = f"{quantization} mb {run.micro_batch}" + "".join(
        f" {word}" for word, on in (("ckpt", run.gradient_checkpointing), ("cache", cost.vision_cache),
                                    ("compiled", run.torch_compile)) if on)  # fmt: skip
    ctx.figures.add(f"train {setting}", f"{rate:.2f} samples/s", origin + (f" ({note})" if note else ""))
    factor, factor_origin = figure(rates, "eval_forward_factor")
    ctx.figures.add("eval forward factor", f"{factor:g}x the training rate", factor_origin)
    load, load_origin = figure(rates, "model_load_s", quantization)
    ctx.figures.add(f"model load {quantization}", f"{load:.0f} s", load_origin)
    seconds = cost.train_samples / rate + cost.eval_samples / (rate * factor)
    cost.hours = (seconds + cost.loads * load) / 3600
    return cost


def estimate(params: Params, rates: dict | None = None, card_gib: float | None = None) -> dict[str, Any]:
    """Every stage's cost and the total (the ``--json`` form). ``card_gib``: the GPU's memory (default: the card
    gpu_check measured on, when it measured one)."""
    rates = rates or load_rates()
    card_gib = card_gib or (rates.get("device") or {}).get("total_gib")
    ctx = Context(params, rates, Figures(), card_gib)
    sizes = Sizes(params)
    captions, vqa = params.data.captions, params.data.vqa
    n_captions = sizes.records(captions.dataset, captions.train_split)
    n_stage1 = min(captions.train_size or n_captions, n_captions)
    n_caption_eval = min(captions.eval_size or math.inf, sizes.records(captions.dataset, captions.eval_split))
    n_vqa_train_all = sizes.records(vqa.dataset, vqa.train_split)
    n_validation = round(n_vqa_train_all * vqa.validation_fraction)
    n_vqa = min(vqa.train_size or math.inf, n_vqa_train_all - n_validation)
    n_monitor = min(vqa.eval_size or math.inf, n_validation or sizes.records(vqa.dataset, vqa.eval_split))
    vqa_images = sizes.images(vqa.dataset, vqa.train_split)
    n_test = sizes.records(vqa.dataset, vqa.eval_split)
    suites = {"vqa-rad": n_test, "path-vqa": sizes.records(params.data.ood.dataset, params.data.ood.split),
              "swap": n_test, "blank": n_test, "expert-prompt": n_test,
              "med-halt": sizes.records(params.data.nonsense.dataset, params.data.nonsense.split)}  # fmt: skip
    if n_validation:
        suites |= {"validation": n_validation, "validation-blank": n_validation}
    # what the sweep points and the controls answer: vqa-rad and validation, each also with blank images
    sighted_and_blank = 2 * (n_test + n_validation)
    answer_images = sizes.images(vqa.dataset, vqa.eval_split) + sizes.images(params.data.ood.dataset,
                                                                             params.data.ood.split)  # fmt: skip
    quantization, cached = quantization_label(params.quantization), _fits(params, answer_images)
    per_second, note, origin = answer_rate(rates, quantization, params.eval.batch_size, cached)
    setting = f"{quantization} batch {params.eval.batch_size}{' cached' if cached else ''}"
    ctx.figures.add(f"answers {setting}", f"{per_second:.2f} answers/s", origin + (f" ({note})" if note else ""))
    load, load_origin = figure(rates, "model_load_s", quantization)
    ctx.figures.add(f"model load {quantization}", f"{load:.0f} s", load_origin)

    def answering(cost: StageCost, answers: int, loads: int) -> StageCost:
        cost.answers += answers
        cost.loads += loads
        cost.vision_cache = cached
        cost.hours += (answers / per_second + loads * load) / 3600
        return cost

    caption_split, vqa_split = (captions.dataset, captions.train_split), (vqa.dataset, vqa.train_split)
    stages = [
        training(ctx, "stage1", params.stage1, n_stage1, n_caption_eval, n_stage1, caption_split),
        training(ctx, "stage2", params.stage2, int(n_vqa), int(n_monitor), vqa_images, vqa_split),
        training(ctx, "single_stage", params.single_stage, int(n_vqa), int(n_monitor), vqa_images, vqa_split),
    ]
    for size in params.sweep.sizes:  # three DVC stages per point, each its own process
        n = min(size, n_captions)
        first = training(ctx, f"sweep_stage1@{size}", params.stage1, n, n_caption_eval, n, caption_split)
        second = training(ctx, f"sweep_stage2@{size}", params.stage2, int(n_vqa), int(n_monitor), vqa_images, vqa_split)
        if n == n_stage1:  # the full stage-1 size: two-stage again (same params, data and seed)
            first.duplicate_of, second.duplicate_of = "stage1", "stage2"
        stages += [first, second, answering(StageCost(f"sweep_evaluate@{size}"), sighted_and_blank, 1)]
    for control in params.controls:  # blind: single-stage's recipe on blank images
        recipe = params.single_stage  # its blank images: one per size, at most as many as the images
        stages.append(training(ctx, f"control_train@{control}", recipe, int(n_vqa), int(n_monitor), vqa_images,
                               vqa_split))  # fmt: skip
        stages.append(answering(StageCost(f"control_evaluate@{control}"), sighted_and_blank, 1))
    for variant in ("base", "single-stage", "two-stage"):
        stages.append(answering(StageCost(f"evaluate@{variant}"), sum(suites.values()), 1))
    stages.append(StageCost("register"))  # the signature only, no input example: MLflow loads no model
    return {
        "profile": params.profile,
        "rates_source": rates["source"],
        "rates_file": rates.get("file"),
        "card_gib": card_gib,
        "assumed_sizes": sorted(sizes.assumed),
        "stages": [asdict(s) for s in stages],
        "figures": ctx.figures.rows(),
        "total_hours": round(sum(s.hours for s in stages), 2),
    }


def render(result: dict[str, Any]) -> str:
    """The table, then every figure it used with its origin; at most 80 columns wide."""
    lines = textwrap.wrap(f"profile {result['profile']}; {result['rates_source']}", 80)
    if result["assumed_sizes"]:
        lines += textwrap.wrap(f"not imported, released sizes assumed: {', '.join(result['assumed_sizes'])}", 80)
    card = f"{result['card_gib']:.0f} GiB card" if result["card_gib"] else "no card measured (--gpu-gib)"
    header = f"{'stage':<22}{'train':>11}{'eval fwd':>10}{'answers':>9}{'loads':>6}{'cache':>6}{'peak':>7}{'hours':>8}"
    lines += [header, "-" * len(header)]
    for s in result["stages"]:
        mark = "*" if s["duplicate_of"] else ""
        peak = f"{s['peak_gib']:.0f}" if s["peak_gib"] is not None else "-"
        lines.append(
            f"{s['name'] + mark:<22}{s['train_samples']:>11,}{s['eval_samples']:>10,}{s['answers']:>9,}"
            f"{s['loads']:>6}{'on' if s['vision_cache'] else '-':>6}{peak:>7}{s['hours']:>8.2f}"
        )
    lines += ["-" * len(header), f"{'total':<71}{result['total_hours']:>8.2f}"]
    lines += textwrap.wrap(f"peak: GiB a training step is predicted to take at its longest sequence ({card})", 80)
    if any(s["duplicate_of"] for s in result["stages"]):
        lines.append("* repeats stage1 or stage2 (the full stage-1 size: same params, data and seed)")
    notes = list(dict.fromkeys(n for s in result["stages"] for n in s["notes"]))
    lines += [line for note in notes for line in textwrap.wrap(note, 80, subsequent_indent="  ")]
    lines.append("figures used (value: what it rests on):")
    for row in result["figures"]:
        text = f"{row['figure']}: {row['value']} — {row['origin']}"
        lines += textwrap.wrap(text, 80, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)
