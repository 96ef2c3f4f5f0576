"""benchmarks/gpu_check.py --dry-run: the one GPU run's script end to end on the CPU (tiny layers behind Idefics2-8b's
real processor, the pinned packages), writing every figure ``med-idefics estimate`` reads, which it then reads as
measured — where and when — in place of the reference rates and assumptions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from med_idefics.config import Params, build
from med_idefics.modeling.measurements import answer_rate, figure, load_rates, predict_peak, train_rate
from med_idefics.workflow.estimate import estimate
from med_idefics.workflow.profiles import apply_profile

pytestmark = pytest.mark.gpu_prep
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    from med_idefics.modeling import realistic

    try:
        realistic.mistral_sentencepiece_file()
    except Exception as err:  # the tokenizer file comes from the mistral-common wheel that `make venv` installs
        pytest.skip(f"tiny-real-processor unavailable: {err}")
    out = tmp_path_factory.mktemp("gpu-check") / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out",
                           str(out)], capture_output=True, text=True, env=env, timeout=900, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return out, json.loads(out.read_text()), done.stdout


def test_every_section_ran_and_wrote_what_it_measured(dry_run):
    _, report, printed = dry_run
    assert report["skipped"] == [] and report["dry_run"] is True and "skipped: nothing" in printed
    settings = {(r["quantization"], r["cache"], r["compiled"], r["gradient_checkpointing"]) for r in report["train"]}
    assert settings == {("4bit", False, False, True), ("4bit", True, False, True), ("float32", True, True, False)}
    assert all(r["samples_per_s"] > 0 for r in report["train"])
    qlora = next(r for r in report["train"] if (r["quantization"], r["cache"]) == ("4bit", False))
    assert qlora["eval_forward_factor"] > 0 and (qlora["micro_batch"], qlora["grad_accum"]) == (2, 2)
    answers = {(r["quantization"], r["batch"], r["cache"]) for r in report["answers"]}
    assert answers == {("4bit", 4, False), ("4bit", 4, True), ("float32", 8, False), ("float32", 8, True)}
    assert set(report["model_load_s"]) == {"4bit", "float32"} and all(s > 0 for s in report["model_load_s"].values())
    memory = {(r["quantization"], r["gradient_checkpointing"], r["compiled"], r["cache"]) for r in report["memory"]}
    assert ("float32", True, False, False) in memory and len(memory) == 4  # checkpointing too: what a fit turns on
    lengths = report["lengths"]["sequence_tokens"]
    for row in report["memory"]:  # three steps, padded to the median, four times it and the longest caption length
        assert [p["tokens"] for p in row["points"]] == lengths["peak_steps"] and "oom" not in row
        assert {"fixed_gib", "gib_per_sample", "gib_per_token"} <= set(row)
    median, _, longest = lengths["peak_steps"]
    assert median < lengths["p50"] + 30 < longest and report["lengths"]["caption_tokens"]["peak_steps"][2] > 250
    assert {"torch", "transformers", "peft", "accelerate", "bitsandbytes"} <= set(report["versions"])


def test_the_estimate_reads_the_dry_run_as_measured(dry_run, repo_root, tmp_path):
    out, report, _ = dry_run
    rates = load_rates(out)
    where = f"measured: {report['device']['name']}, {report['measured_at']} (dry run: tiny shapes, not the 8B model)"
    cached = next(r for r in report["answers"] if (r["quantization"], r["cache"]) == ("4bit", True))
    assert train_rate(rates, "4bit", 2, False, False)[2] == where
    assert answer_rate(rates, "4bit", 4, True) == (cached["answers_per_s"], "", where)
    assert figure(rates, "model_load_s", "4bit") == (report["model_load_s"]["4bit"], where)
    qlora = next(r for r in report["train"] if (r["quantization"], r["cache"]) == ("4bit", False))
    assert figure(rates, "eval_forward_factor") == (report["eval_forward_factor"], where)
    assert report["eval_forward_factor"] == qlora["eval_forward_factor"]  # the paper profile's: QLoRA's
    peak, origin = predict_peak(rates, "4bit", True, False, False, 2, 200)
    assert peak > 0 and origin == where
    params = apply_profile(yaml.safe_load((repo_root / "params.yaml").read_text()), "paper", repo_root / "configs")
    params["data"]["root"] = str(tmp_path / "data")
    origins = {row["figure"]: row["origin"] for row in estimate(build(Params, params), rates)["figures"]}
    for name in ("train 4bit mb 2 ckpt", "model load 4bit", "eval forward factor", "answers 4bit batch 8 cached"):
        assert origins[name].startswith(where), (name, origins[name])
