"""What ``dvc repro`` costs under the current params, before anyone spends a GPU-day: per pipeline stage, its training
samples (examples x epochs), in-training evaluation forward passes, generated answers and model loads, and the hours
they take at a rate table.

Rates: :data:`REFERENCE_RATES` (issue 17's measurements on one H200, random weights in the exact Idefics2-8b shape),
replaced by ``benchmarks/results/gpu_check.json`` when ``benchmarks/gpu_check.py`` has written it there (or any file
given as ``--rates``): the same keys. A training rate is looked up by quantization, vision cache, torch.compile and
micro-batch (log-log interpolation between measured micro-batches, the nearest outside them); answers/s by batch size
alike. An in-training evaluation forward pass is counted at ``eval_forward_factor`` x the training rate (no backward
pass; an assumption until measured), a model load at ``model_load_s``.

Sizes: a split's record count from ``data/`` when it is imported, else :data:`RELEASED_SIZES` (the released datasets;
ROCO's from its hub card, not verified here). A VQA validation carve-out counts as ``validation_fraction`` of train's
questions (it is drawn by image: the real count differs by a few).
"""

from __future__ import annotations

import itertools
import json
import math
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from med_idefics.config import Params, StageConfig

GPU_CHECK_RESULTS = Path("benchmarks/results/gpu_check.json")
IDEFICS2_8B_IMAGE_BYTES = (980 // 14) ** 2 * 1152 * 2  # 4,900 patches x 1,152 wide, bf16: ~11 MB per image

#: Issue 17: one H200, random weights in the Idefics2-8b shape, LoRA r 8 on text + connector, ~150 tokens,
#: transformers 5.17 / peft 0.21. ``compiled`` = torch.compile with lora.dropout 0.
REFERENCE_RATES: dict[str, Any] = {
    "source": "reference rates (issue 17: one H200, Idefics2-8b shape, random weights)",
    "train": [
        {"quantization": "4bit", "micro_batch": 2, "cache": False, "compiled": False, "samples_per_s": 6.1},
        {"quantization": "4bit", "micro_batch": 16, "cache": False, "compiled": False, "samples_per_s": 33.4},
        {"quantization": "bf16", "micro_batch": 16, "cache": False, "compiled": False, "samples_per_s": 37.7},
        {"quantization": "bf16", "micro_batch": 32, "cache": False, "compiled": False, "samples_per_s": 39.6},
        {"quantization": "bf16", "micro_batch": 16, "cache": True, "compiled": False, "samples_per_s": 43.6},
        {"quantization": "bf16", "micro_batch": 32, "cache": True, "compiled": False, "samples_per_s": 46.9},
        {"quantization": "bf16", "micro_batch": 32, "cache": True, "compiled": True, "samples_per_s": 64.3},
        # derived, not measured: micro-batch 16's cached rate x the compile gain measured at 32 (64.3 / 46.9)
        {"quantization": "bf16", "micro_batch": 16, "cache": True, "compiled": True, "samples_per_s": 59.8},
    ],
    "answers": [{"batch": 1, "answers_per_s": 0.95}, {"batch": 64, "answers_per_s": 45.0}],
    "eval_forward_factor": 3.0,  # assumed: a forward pass costs about a third of a training step's forward + backward
    "model_load_s": 120.0,  # assumed: 16 GB from a local disk (+ 4-bit quantization)
}

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
    duplicate_of: str | None = None
    notes: list[str] = field(default_factory=list)


def load_rates(path: str | Path | None = None) -> dict[str, Any]:
    """``path``, else gpu_check's results when they exist, else the reference rates. Measured training rows replace
    the reference rows of the same setting; settings gpu_check did not measure (QLoRA without bitsandbytes, say)
    keep the reference rate, and the source says so."""
    candidate = Path(path) if path else GPU_CHECK_RESULTS
    if not candidate.is_file():
        return REFERENCE_RATES
    measured = json.loads(candidate.read_text())

    def key(row: dict) -> tuple:
        return row["quantization"], row["micro_batch"], row["cache"], row["compiled"]

    rows = list(measured.get("train", []))
    kept = [row for row in REFERENCE_RATES["train"] if key(row) not in {key(r) for r in rows}]
    source = measured.get("source", str(candidate)) + (" + reference rates for the rest" if kept else "")
    rates = {**REFERENCE_RATES, **{k: v for k, v in measured.items() if k in REFERENCE_RATES and v}}
    return rates | {"train": rows + kept, "source": source}


def _interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Log-log between the two measured points around ``x``; the nearest point's value outside them."""
    points = sorted(points)
    if x <= points[0][0]:
        return points[0][1]
    if x >= points[-1][0]:
        return points[-1][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            t = math.log(x / x0) / math.log(x1 / x0)
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    raise AssertionError("unreachable")


def train_rate(rates: dict, quantization: str, micro_batch: int, cache: bool, compiled: bool) -> tuple[float, str]:
    """(samples/s, a note when no row matched exactly and a simpler setting's rate stands in)."""
    rows = rates["train"]
    for relaxed, note in (((), ""), (("compiled",), "as uncompiled"), (("compiled", "cache"), "as uncached")):
        want = {"quantization": quantization, "cache": cache, "compiled": compiled}
        for key in relaxed:
            want[key] = False
        match = [r for r in rows if all(r[k] == v for k, v in want.items())]
        if match:
            points = [(r["micro_batch"], r["samples_per_s"]) for r in match]
            return _interpolate(points, micro_batch), note and f"{quantization} at {micro_batch} {note}"
    points = [(r["micro_batch"], r["samples_per_s"]) for r in rows if r["quantization"] == "bf16"]
    return _interpolate(points, micro_batch), f"no {quantization} rate: bf16's"


def answer_rate(rates: dict, batch: int) -> float:
    return _interpolate([(r["batch"], r["answers_per_s"]) for r in rates["answers"]], batch)


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


def _quantization(params: Params) -> str:
    return "4bit" if params.quantization.load_in_4bit else "bf16"


def _fits(params: Params, images: int) -> bool:
    cfg = params.vision_cache
    return cfg.enabled and images * IDEFICS2_8B_IMAGE_BYTES <= cfg.max_gib * 2**30


def training(params: Params, rates: dict, name: str, recipe: StageConfig, n: int, n_eval: int, images: int):
    cost = StageCost(name, loads=1)
    per_epoch = math.ceil(math.ceil(n / recipe.micro_batch) / recipe.grad_accum)
    cost.optimizer_steps = recipe.max_steps if recipe.max_steps > 0 else math.ceil(per_epoch * recipe.epochs)
    cost.train_samples = cost.optimizer_steps * recipe.micro_batch * recipe.grad_accum
    evaluations = cost.optimizer_steps // recipe.eval_steps + 1  # every eval_steps, and the final one
    cost.eval_samples = evaluations * n_eval if n_eval else 0
    cost.vision_cache = _fits(params, images)
    rate, note = train_rate(rates, _quantization(params), recipe.micro_batch, cost.vision_cache, recipe.torch_compile)
    cost.notes += [note] if note else []
    seconds = cost.train_samples / rate + cost.eval_samples / (rate * rates["eval_forward_factor"])
    cost.hours = (seconds + cost.loads * rates["model_load_s"]) / 3600
    return cost


def estimate(params: Params, rates: dict | None = None) -> dict[str, Any]:
    """Every stage's cost and the total (the ``--json`` form)."""
    rates = rates or load_rates()
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
    seconds_per_answer = 1 / answer_rate(rates, params.eval.batch_size)

    def answering(cost: StageCost, answers: int, loads: int) -> StageCost:
        cost.answers += answers
        cost.loads += loads
        cost.hours += (answers * seconds_per_answer + loads * rates["model_load_s"]) / 3600
        return cost

    stages = [
        training(params, rates, "stage1", params.stage1, n_stage1, n_caption_eval, n_stage1),
        training(params, rates, "stage2", params.stage2, int(n_vqa), int(n_monitor), vqa_images),
        training(params, rates, "single_stage", params.single_stage, int(n_vqa), int(n_monitor), vqa_images),
    ]
    for size in params.sweep.sizes:  # three DVC stages per point, each its own process
        n = min(size, n_captions)
        first = training(params, rates, f"sweep_stage1@{size}", params.stage1, n, n_caption_eval, n)
        second = training(params, rates, f"sweep_stage2@{size}", params.stage2, int(n_vqa), int(n_monitor), vqa_images)
        if n == n_stage1:  # the full stage-1 size: two-stage again (same params, data and seed)
            first.duplicate_of, second.duplicate_of = "stage1", "stage2"
        stages += [first, second, answering(StageCost(f"sweep_evaluate@{size}"), sighted_and_blank, 1)]
    for control in params.controls:  # blind: single-stage's recipe on blank images
        recipe = params.single_stage  # its blank images: one per size, at most as many as the images
        stages.append(training(params, rates, f"control_train@{control}", recipe, int(n_vqa), int(n_monitor),
                               vqa_images))  # fmt: skip
        stages.append(answering(StageCost(f"control_evaluate@{control}"), sighted_and_blank, 1))
    for variant in ("base", "single-stage", "two-stage"):
        stages.append(answering(StageCost(f"evaluate@{variant}"), sum(suites.values()), 1))
    stages.append(StageCost("register"))  # the signature only, no input example: MLflow loads no model
    return {
        "profile": params.profile,
        "rates_source": rates["source"],
        "assumed_sizes": sorted(sizes.assumed),
        "stages": [asdict(s) for s in stages],
        "total_hours": round(sum(s.hours for s in stages), 2),
    }


def render(result: dict[str, Any]) -> str:
    """The table, at most 80 columns wide."""
    lines = textwrap.wrap(f"profile {result['profile']}; {result['rates_source']}", 80)
    if result["assumed_sizes"]:
        lines += textwrap.wrap(f"not imported, released sizes assumed: {', '.join(result['assumed_sizes'])}", 80)
    header = f"{'stage':<22}{'train':>11}{'eval fwd':>10}{'answers':>9}{'loads':>6}{'cache':>6}{'hours':>8}"
    lines += [header, "-" * len(header)]
    for s in result["stages"]:
        mark = "*" if s["duplicate_of"] else ""
        lines.append(
            f"{s['name'] + mark:<22}{s['train_samples']:>11,}{s['eval_samples']:>10,}{s['answers']:>9,}"
            f"{s['loads']:>6}{'on' if s['vision_cache'] else '-':>6}{s['hours']:>8.2f}"
        )
    lines += ["-" * len(header), f"{'total':<64}{result['total_hours']:>8.2f}"]
    if any(s["duplicate_of"] for s in result["stages"]):
        lines.append("* repeats stage1 or stage2 (the full stage-1 size: same params, data and seed)")
    notes = sorted({n for s in result["stages"] for n in s["notes"]})
    lines += [line for note in notes for line in textwrap.wrap(f"rate stand-in: {note}", 80)]
    return "\n".join(lines)
