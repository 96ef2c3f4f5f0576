"""The benchmark scripts' CPU paths (their GPU shapes share the code; only sizes differ)."""

from __future__ import annotations

import importlib
import re
import sys

import pytest


@pytest.fixture
def train_throughput(repo_root, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    monkeypatch.chdir(repo_root)  # reads params.yaml
    module = importlib.import_module("train_throughput")
    yield module
    sys.modules.pop("train_throughput", None)


def test_train_throughput_qlora_trains_a_4bit_base(train_throughput, capsys):
    train_throughput.main(["--qlora", "--steps", "1", "--micro-batch", "2"])
    out = capsys.readouterr().out
    layers = re.search(r"QLoRA \((\d+) 4-bit nf4 layers\)", out)
    assert layers and int(layers.group(1)) > 0, out
    assert re.search(r"^\s+1\s+2\s+1\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, re.MULTILINE), out  # one timed step of 2


def test_demo_run_reports_the_criteria_from_a_finished_demos_files(repo_root, monkeypatch, tmp_path):
    """benchmarks/demo_run.py's table row: each figure read from the metrics and paired-test files."""
    import json

    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    demo_run = importlib.import_module("demo_run")
    values = {
        ("two-stage", "vqa-rad"): {"closed_accuracy": 0.85, "exact_match": 0.90},
        ("two-stage", "swap"): {"closed_accuracy": 0.55},
        ("two-stage", "expert-prompt"): {"closed_accuracy": 0.87},
        ("two-stage", "med-halt"): {"abstention_rate": 0.2},
        ("base", "vqa-rad"): {"closed_accuracy": 0.70},
        ("base", "med-halt"): {"abstention_rate": 0.9},
        ("single-stage", "vqa-rad"): {"closed_accuracy": 0.75, "exact_match": 0.80},
        ("two-stage-n500", "vqa-rad"): {"exact_match": 0.86},
        ("two-stage-n100", "vqa-rad"): {"exact_match": 0.79},
    }
    for (variant, suite), numbers in values.items():
        (tmp_path / "metrics" / variant).mkdir(parents=True, exist_ok=True)
        (tmp_path / "metrics" / variant / f"{suite}.json").write_text(json.dumps(numbers))
    claim = {"title": "Two-stage vs single-stage", "test": {"exact_match": {"diff": 0.1, "p_value": 0.003}}}
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "paired_tests.json").write_text(json.dumps({"claims": [claim]}))

    row = demo_run.table_row(7, 2, demo_run.criteria(tmp_path), "14 passed", 251.4)
    assert row == (
        "| 7 | 2 | 0.850 ✓ | 0.700 / 0.90 ✗ | +0.100 (3.0e-03) ✓ | 30.0 pts ✓ | -2.0 pts ✓ "
        "| 0.800 → 0.790 → 0.860 → 0.900 ✓ | 14 passed | 251 s |"
    )
    params = tmp_path / "params.yaml"
    params.write_text("profile: demo\nseed: 42\nmodel:\n  seed: 1\n")
    demo_run.set_seed(params, 2026)
    assert params.read_text() == "profile: demo\nseed: 2026\nmodel:\n  seed: 1\n"
    sys.modules.pop("demo_run", None)


def test_feature_cache_benchmark_reports_ratios_with_the_equality_checks(repo_root, monkeypatch, capsys):
    """benchmarks/feature_cache.py at small sizes: its JSON, and the cached path equal to the plain one."""
    import json

    from med_idefics.modeling import realistic

    try:
        realistic.mistral_sentencepiece_file()
    except Exception as err:  # the tokenizer file comes from the mistral-common wheel that `make venv` installs
        pytest.skip(f"tiny-real-processor unavailable: {err}")
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    feature_cache = importlib.import_module("feature_cache")
    try:
        result = feature_cache.main(["--steps", "3", "--micro-batch", "2", "--questions", "4", "--batch", "2",
                                     "--new-tokens", "2", "--json"])  # fmt: skip
    finally:
        sys.modules.pop("feature_cache", None)
    printed = capsys.readouterr().out  # the JSON alone (the Trainer's log lines went to stderr)
    assert json.loads(printed) == json.loads(json.dumps(result))
    assert {"train_ratio", "eval_ratio", "max_loss_rel_diff", "answers_identical"} <= set(result)
    assert result["train_ratio"] > 0 and result["eval_ratio"] > 0  # timings: reported, never asserted
    assert result["max_loss_rel_diff"] < 1e-4 and result["answers_identical"] is True


def test_gpu_check_fits_memory_over_the_steps_that_ran_and_records_the_one_that_did_not(repo_root, monkeypatch):
    """gpu_check's memory row: fixed + micro_batch x (per_sample + per_token x tokens), least squares over the peak
    steps that ran; a step out of memory is recorded with its length, and the fit uses the shorter ones."""
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    gpu_check = importlib.import_module("gpu_check")
    try:
        setting = {"quantization": "bf16", "gradient_checkpointing": False, "compiled": True, "cache": True,
                   "micro_batch": 16, "oom": "CUDA out of memory"}  # fmt: skip
        peaks = [[{"input_ids": [0] * n}] for n in (100, 200, 400)]
        # untimed step 0, then the peak steps at 100 and 200 tokens: 20 + 16 x (0.01 + 0.001 x n); 400 ran out
        begins, peak_gib = [5.0, 20.0, 20.0], [30.0, 20 + 16 * (0.01 + 0.1), 20 + 16 * (0.01 + 0.2)]
        row = gpu_check.memory_row(setting, begins, peak_gib, peaks, 1, 16)
    finally:
        sys.modules.pop("gpu_check", None)
    assert [p["tokens"] for p in row["points"]] == [100, 200] and row["oom_tokens"] == 400
    assert row["fixed_gib"] == 20.0 and abs(row["gib_per_token"] - 0.001) < 1e-9
    assert abs(row["gib_per_sample"] - 0.01) < 1e-6


def test_long_runs_disk_table_counts_the_8b_shapes_lora_as_its_dimensions_say(repo_root, monkeypatch, capsys):
    """benchmarks/long_runs.py --disk-only builds the Idefics2-8B shape on the meta device; the LoRA it counts is
    r x (in + out) of every targeted projection: 32 Mistral layers (hidden 4096, 8 KV heads of 128, MLP 14336), the
    perceiver's 3 (16 heads and 4 KV heads of 96, MLP 4 x 4096) and the connector's MLP (1152 → 14336 → 4096)."""
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    long_runs = importlib.import_module("long_runs")
    from med_idefics.config import load_params

    params = load_params(repo_root / "params.yaml")
    (name, need), (_, tiny) = long_runs.disk_rows(params)

    def lora(*shapes: tuple[int, int]) -> int:
        return sum(params.lora.r * (fan_in + fan_out) for fan_in, fan_out in shapes)

    text = lora((4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336), (14336, 4096))
    perceiver = lora((4096, 1536), (4096, 384), (4096, 384), (1536, 4096), (4096, 16384), (4096, 16384), (16384, 4096))
    connector = lora((1152, 14336), (1152, 14336), (14336, 4096))
    assert name == "Idefics2-8B shape" and need.trainable == 32 * text + 3 * perceiver + connector
    assert need.adapter == 4 * need.trainable and need.total == 3 * need.checkpoint + need.adapter  # fp32 LoRA
    out = capsys.readouterr().out
    assert f"| Idefics2-8B shape | {need.trainable:,} |" in out and f"| tiny base | {tiny.trainable:,} |" in out
