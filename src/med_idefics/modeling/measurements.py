"""What a GPU run of ``benchmarks/gpu_check.py`` measured, and what stands in where it measured nothing: training
and answering rates, the evaluation forward factor, model load times, and the memory a training step takes.

The measurements are ``benchmarks/results/gpu_check.json`` of the repository (found from the cwd upwards, else
beside this package's checkout: never relative to the cwd itself). Every figure carries its origin — ``measured:
<card>, <date>``, the reference rates of issue 17 (one H200, random weights in the Idefics2-8b shape), or
``assumed`` — so that ``med-idefics estimate`` prints beside each figure what it rests on.

Memory: gpu_check fits, per setting (quantization, activation checkpointing, torch.compile, vision cache), a step's
peak as ``fixed + micro_batch x (per_sample + per_token x tokens)`` from steps whose every sequence is padded to a
given length (the worst case a batch can reach: padding makes each sample as long as the batch's longest).
:func:`fit_recipe` predicts a training stage's peak from its longest training sequence and, where that would not fit
the card, finds the fastest recipe that does with the same examples per optimizer step: the micro-batch split
(accumulation up) and/or activation checkpointing on.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from med_idefics.config import ConfigError, StageConfig

GPU_CHECK_FILE = Path("benchmarks") / "results" / "gpu_check.json"
REFERENCE = "reference: issue 17, one H200, random weights"
ASSUMED = "assumed"
#: Assumed where no rate was measured both ways: activation checkpointing recomputes each layer's forward pass in
#: the backward one, about a third more work per step.
CHECKPOINTING_SPEED = 0.75
#: Assumed when choosing how to fit a step into memory: a micro-step of this many tokens (micro-batch x sequence)
#: or more keeps the GPU's matrix units busy, so splitting the micro-batch costs nothing until a micro-step holds
#: fewer, and then in proportion. (The measured rates are at ~150-token sequences: they cannot say it for long ones.)
BUSY_TOKENS = 2048

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
        {
            "quantization": "bf16",
            "micro_batch": 16,
            "cache": True,
            "compiled": True,
            "samples_per_s": 59.8,
            "origin": "derived from issue 17's H200 rates (16 cached x the compile gain at 32)",
        },
    ],
    "answers": [
        {"quantization": "bf16", "batch": 1, "cache": False, "answers_per_s": 0.95},
        {"quantization": "bf16", "batch": 64, "cache": False, "answers_per_s": 45.0},
    ],
    "memory": [],  # nothing measured before gpu_check: no peak is predicted
}
#: Assumed until gpu_check measures them.
ASSUMED_FIGURES = {
    "eval_forward_factor": 3.0,  # a forward pass costs about a third of a training step's forward + backward
    "model_load_s": {"4bit": 120.0, "bf16": 120.0},  # 16 GB from a local disk (+ 4-bit quantization)
}


def measurements_file() -> Path:
    """``benchmarks/results/gpu_check.json`` of the repository holding the cwd, else of this package's checkout."""
    from med_idefics.tracking.provenance import find_repo_root

    candidates = [find_repo_root() / GPU_CHECK_FILE, Path(__file__).resolve().parents[3] / GPU_CHECK_FILE]
    return next((path for path in candidates if path.is_file()), candidates[0])


def _defaults(row: dict, origin: str) -> dict:
    """A row with its checkpointing (QLoRA trained with it, bf16 without, as the profiles do) and origin."""
    row = {"gradient_checkpointing": row["quantization"] == "4bit", "origin": origin} | row
    return row | {"cache": bool(row.get("cache", False))}


def load_rates(path: str | Path | None = None) -> dict[str, Any]:
    """The figures the estimate and the training stages use: ``path`` (default :func:`measurements_file`) merged
    over the reference rates and the assumptions, every row and figure with its ``origin``. A measured row
    replaces the reference row of the same setting; what gpu_check did not measure keeps its stand-in."""
    candidate = Path(path) if path else measurements_file()
    rates: dict[str, Any] = {
        "source": REFERENCE_RATES["source"], "file": None, "device": None,
        "train": [_defaults(r, r.get("origin", REFERENCE)) for r in REFERENCE_RATES["train"]],
        "answers": [_defaults(r, REFERENCE) for r in REFERENCE_RATES["answers"]],
        "memory": [],
        "eval_forward_factor": {"value": ASSUMED_FIGURES["eval_forward_factor"], "origin": ASSUMED},
        "model_load_s": {q: {"value": s, "origin": ASSUMED} for q, s in ASSUMED_FIGURES["model_load_s"].items()},
    }  # fmt: skip
    if not candidate.is_file():
        return rates
    measured = json.loads(candidate.read_text())
    origin = measured_origin(measured)
    rates |= {"file": str(candidate), "device": measured.get("device"), "source": measured.get("source", origin)}

    def replace(kind: str, rows: list[dict], key: tuple[str, ...]) -> None:
        new = [_defaults(r, origin) for r in rows]
        keys = {tuple(r[k] for k in key) for r in new}
        rates[kind] = new + [r for r in rates[kind] if tuple(r[k] for k in key) not in keys]

    replace("train", measured.get("train", []), ("quantization", "micro_batch", "cache", "compiled",
                                                 "gradient_checkpointing"))  # fmt: skip
    answers = measured.get("answers", []) + [r | {"cache": True} for r in measured.get("answers_cached", [])]
    replace("answers", [{"quantization": "bf16"} | r for r in answers], ("quantization", "batch", "cache"))
    fitted = [r for r in measured.get("memory", []) if "gib_per_token" in r]  # not those with one step that fit
    rates["memory"] = [r | {"origin": origin} for r in fitted]
    if measured.get("eval_forward_factor"):
        rates["eval_forward_factor"] = {"value": measured["eval_forward_factor"], "origin": origin}
    loads = measured.get("model_load_s")
    loads = {"bf16": loads} if isinstance(loads, int | float) else loads or {}  # an older file: one figure
    rates["model_load_s"] |= {q: {"value": s, "origin": origin} for q, s in loads.items() if s}
    return rates


def measured_origin(measured: dict) -> str:
    device = (measured.get("device") or {}).get("name", "an unnamed device")
    dry = " (dry run: tiny shapes, not the 8B model)" if measured.get("dry_run") else ""
    return f"measured: {device}, {measured.get('measured_at', 'undated')}{dry}"


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


def train_rate(rates: dict, quantization: str, micro_batch: int, cache: bool, compiled: bool,
               checkpointing: bool | None = None) -> tuple[float, str, str]:  # fmt: skip
    """(samples/s, a note when a simpler setting's rate stands in, its origin). ``checkpointing`` None: as the
    profiles train (QLoRA with it, bf16 without); a rate measured the other way is scaled by
    :data:`CHECKPOINTING_SPEED`, assumed."""
    if checkpointing is None:
        checkpointing = quantization == "4bit"
    rows = rates["train"]
    for relaxed, note in (((), ""), (("compiled",), "as uncompiled"), (("compiled", "cache"), "as uncached")):
        want = {"quantization": quantization, "cache": cache, "compiled": compiled}
        want |= dict.fromkeys(relaxed, False)
        for same, scale, how in ((True, 1.0, ""), (False, CHECKPOINTING_SPEED, "checkpointing x0.75 assumed")):
            if not same:
                scale = scale if checkpointing else 1 / scale
            match = [r for r in rows if all(r[k] == v for k, v in want.items())
                     and r["gradient_checkpointing"] == (checkpointing if same else not checkpointing)]  # fmt: skip
            if match:
                rate = _interpolate([(r["micro_batch"], r["samples_per_s"]) for r in match], micro_batch) * scale
                notes = ", ".join(filter(None, (note, how)))
                return rate, notes and f"{quantization} at {micro_batch} {notes}", _origin(match, micro_batch)
    points = [(r["micro_batch"], r["samples_per_s"]) for r in rows if r["quantization"] == "bf16"]
    return _interpolate(points, micro_batch), f"no {quantization} rate: bf16's", ASSUMED


def _origin(rows: list[dict], x: int, key: str = "micro_batch") -> str:
    nearest = min(rows, key=lambda r: abs(math.log(r[key] / x)))
    exact = any(r[key] == x for r in rows)
    return nearest["origin"] + ("" if exact else ", interpolated")


def answer_rate(rates: dict, quantization: str, batch: int, cache: bool) -> tuple[float, str, str]:
    """(answers/s, a note when another setting's rate stands in, its origin)."""
    for want, note in (((quantization, cache), ""), ((quantization, False), "as uncached"), (("bf16", cache), "bf16's"),
                       (("bf16", False), "bf16 uncached")):  # fmt: skip
        match = [r for r in rates["answers"] if (r["quantization"], r["cache"]) == want]
        if match:
            rate = _interpolate([(r["batch"], r["answers_per_s"]) for r in match], batch)
            return rate, note and f"answers {quantization} batch {batch} {note}", _origin(match, batch, "batch")
    raise ConfigError("the rate table holds no answering rate at all")


def figure(rates: dict, name: str, quantization: str | None = None) -> tuple[float, str]:
    """(value, origin) of ``eval_forward_factor`` or ``model_load_s`` (per quantization)."""
    entry = rates[name] if quantization is None else rates[name].get(quantization) or rates[name]["bf16"]
    return entry["value"], entry["origin"]


# --------------------------------------------------------------------------------------------------------------------
# Memory


@dataclass
class MemoryFit:
    """A training stage's recipe as it will run on the card, its predicted peak, and why."""

    micro_batch: int
    grad_accum: int
    checkpointing: bool
    peak_gib: float | None = None  # None: not predicted (see note)
    card_gib: float | None = None
    changed: bool = False
    note: str = ""
    origin: str = ""

    def apply(self, recipe: StageConfig) -> StageConfig:
        return dataclasses.replace(recipe, micro_batch=self.micro_batch, grad_accum=self.grad_accum,
                                   gradient_checkpointing=self.checkpointing)  # fmt: skip


def predict_peak(rates: dict, quantization: str, checkpointing: bool, compiled: bool, cache: bool, micro_batch: int,
                 tokens: int) -> tuple[float | None, str]:  # fmt: skip
    """(GiB at the step's peak, origin) for ``micro_batch`` sequences padded to ``tokens``; (None, why) when no
    memory was measured for this quantization and checkpointing."""
    setting = (quantization, checkpointing)
    rows = [r for r in rates["memory"] if (r["quantization"], r["gradient_checkpointing"]) == setting]
    wanted = {"compiled": compiled, "cache": cache}
    for relaxed in ((), ("compiled",), ("compiled", "cache")):
        match = [r for r in rows if all(r[k] == v for k, v in wanted.items() if k not in relaxed)]
        if match:
            row = match[0]
            peak = row["fixed_gib"] + micro_batch * (row["gib_per_sample"] + row["gib_per_token"] * tokens)
            words = {"compiled": "compiled", "cache": "cached"}
            differs = [f"as {'' if row[k] else 'un'}{word}" for k, word in words.items() if row[k] != wanted[k]]
            return peak, ", ".join([row["origin"], *differs])
    ckpt = "with" if checkpointing else "without"
    return None, f"no memory measured for {quantization} {ckpt} activation checkpointing"


def _divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def fit_recipe(
    rates: dict,
    recipe: StageConfig,
    quantization: str,
    cache: bool,
    tokens: int | None,
    card_gib: float | None,
    headroom_gib: float,
    adjust: bool,
    stage: str = "stage",
) -> MemoryFit:
    """The recipe ``stage`` runs on a card of ``card_gib`` (None: no GPU known) given its longest training sequence
    ``tokens`` (None: unknown). When its peak would not fit under ``card_gib - headroom_gib`` and ``adjust``: the
    recipe that fits with as many examples per optimizer step (micro-batch x accumulation), the micro-batch split
    and/or activation checkpointing on, that :data:`BUSY_TOKENS` and :data:`CHECKPOINTING_SPEED` make fastest; a
    :class:`ConfigError` when none fits."""
    fit = MemoryFit(recipe.micro_batch, recipe.grad_accum, recipe.gradient_checkpointing, card_gib=card_gib)
    if tokens is None:
        return dataclasses.replace(fit, note="longest training sequence unknown")
    peak, origin = predict_peak(rates, quantization, recipe.gradient_checkpointing, recipe.torch_compile, cache,
                                recipe.micro_batch, tokens)  # fmt: skip
    fit = dataclasses.replace(fit, peak_gib=peak, origin=origin)
    if peak is None:
        return dataclasses.replace(fit, note=origin)
    if card_gib is None or peak <= card_gib - headroom_gib:
        return fit
    limit, examples = card_gib - headroom_gib, recipe.micro_batch * recipe.grad_accum
    over = f"{stage}: predicted peak {peak:.1f} GiB at micro-batch {recipe.micro_batch} x {tokens} tokens > {limit:.1f}"
    if not adjust:
        return dataclasses.replace(fit, note=f"{over}: would not fit (memory.fit: true splits the micro-batch or "
                                   "turns on activation checkpointing)")  # fmt: skip
    candidates = []
    for checkpointing in sorted({recipe.gradient_checkpointing, True}):
        for micro_batch in _divisors(recipe.micro_batch):
            need, _ = predict_peak(rates, quantization, checkpointing, recipe.torch_compile, cache, micro_batch, tokens)
            if need is not None and need <= limit:
                speed = min(1.0, micro_batch * tokens / BUSY_TOKENS) * (CHECKPOINTING_SPEED if checkpointing else 1)
                candidates.append((speed, micro_batch, not checkpointing, need))
    if not candidates:
        raise ConfigError(
            f"{over} GiB of the {card_gib:.1f} GiB card, and no split of its {examples} examples per step fits, with "
            "activation checkpointing or without. Use a larger card, QLoRA (quantization.load_in_4bit: true), or "
            "shorter training texts"
        )
    _, micro_batch, unchecked, need = max(candidates)  # the fastest by the assumptions above; ties: larger batches
    checkpointing = not unchecked
    changes = []
    if micro_batch != recipe.micro_batch:
        changes.append(f"micro-batch {micro_batch} x accumulation {examples // micro_batch} (same {examples} per step)")
    if checkpointing != recipe.gradient_checkpointing:
        changes.append("activation checkpointing on")
    return MemoryFit(micro_batch, examples // micro_batch, checkpointing, need, card_gib, True,
                     f"{over} GiB: {' and '.join(changes)}, predicted {need:.1f} GiB", origin)  # fmt: skip


def quantization_label(quantization) -> str:
    """How the rate and memory rows name a precision: ``4bit`` for QLoRA, else the compute dtype (``bf16``,
    ``fp16``, ``float32``)."""
    if quantization.load_in_4bit:
        return "4bit"
    return {"bfloat16": "bf16", "float16": "fp16"}.get(quantization.compute_dtype, quantization.compute_dtype)


def gpu_memory_gib() -> float | None:
    """This process's GPU's memory (None without CUDA)."""
    import torch

    from med_idefics.modeling.loading import local_device

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(local_device()).total_memory / 2**30
