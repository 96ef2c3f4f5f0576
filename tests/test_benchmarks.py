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


def test_gpu_check_cpu_path_writes_a_rate_table_estimate_reads(repo_root, monkeypatch, tmp_path):
    """benchmarks/gpu_check.py --shape tiny-real-processor --device cpu: every section runs (QLoRA too: bitsandbytes
    is installed here), the adapter reloaded through the registered model answers as before, and `estimate` reads
    the result as its rate table."""
    import json

    from med_idefics.modeling import realistic
    from med_idefics.workflow.estimate import load_rates, train_rate

    try:
        realistic.mistral_sentencepiece_file()
    except Exception as err:
        pytest.skip(f"tiny-real-processor unavailable: {err}")
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    gpu_check = importlib.import_module("gpu_check")
    out = tmp_path / "gpu_check.json"
    try:
        report = gpu_check.main(["--shape", "tiny-real-processor", "--device", "cpu", "--steps", "1",
                                 "--micro-batches", "2", "--answer-batches", "1,2", "--new-tokens", "2",
                                 "--workers", "0", "--out", str(out)])  # fmt: skip
    finally:
        sys.modules.pop("gpu_check", None)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    settings = {(r["quantization"], r["micro_batch"], r["cache"]) for r in report["train"]}
    assert settings == {("float32", 2, False), ("float32", 2, True), ("4bit", 2, False), ("4bit", 2, True)}
    assert all(r["samples_per_s"] > 0 and r["peak_gib"] > 0 for r in report["train"])
    assert [a["batch"] for a in report["answers"]] == [a["batch"] for a in report["answers_cached"]] == [1, 2]
    assert report["flow"]["answers_equal_after_reload"] is True and report["model_load_s"] > 0
    assert report["skipped"] == []
    rates = load_rates(out)
    assert train_rate(rates, "4bit", 2, False, False)[0] == next(
        r["samples_per_s"] for r in report["train"] if (r["quantization"], r["cache"]) == ("4bit", False)
    )


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
