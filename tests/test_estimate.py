"""``med-idefics estimate``: the paper profile's counts, the rate table and its replacement by gpu_check's results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml
from click.testing import CliRunner

from med_idefics.cli import main
from med_idefics.config import Params, build
from med_idefics.workflow.estimate import REFERENCE_RATES, answer_rate, estimate, load_rates, render, train_rate
from med_idefics.workflow.profiles import apply_profile


def profile_params(repo_root: Path, profile: str, tmp_path: Path) -> Params:
    data = apply_profile(yaml.safe_load((repo_root / "params.yaml").read_text()), profile, repo_root / "configs")
    data["data"]["root"] = str(tmp_path / "data")  # nothing imported: the released sizes
    return build(Params, data)


def test_the_paper_profile_counts(repo_root, tmp_path):
    params = profile_params(repo_root, "paper", tmp_path)
    result = estimate(params, REFERENCE_RATES)
    stages = {s["name"]: s for s in result["stages"]}
    steps = math.ceil(math.ceil(55_000 / 2) / 8) * 3  # micro-batch 2 x 8 accumulation, 3 epochs
    assert stages["stage1"]["optimizer_steps"] == steps and stages["stage1"]["train_samples"] == steps * 16
    assert stages["stage1"]["eval_samples"] == (steps // 1_000 + 1) * 500  # 500 captions every 1,000 steps
    assert not stages["stage1"]["vision_cache"] and stages["stage2"]["vision_cache"]  # ROCO does not fit, VQA-RAD does
    # VQA-RAD: 1,797 train questions less a 10 % validation carve-out; 2 epochs
    assert stages["stage2"]["train_samples"] == math.ceil(math.ceil(1_617 / 2) / 8) * 2 * 16
    # vqa-rad, swap, blank, expert-prompt; path-vqa; med-halt; validation and validation-blank
    per_variant = 451 * 4 + 6_761 + 1_858 + 180 * 2
    assert stages["evaluate@two-stage"]["answers"] == per_variant and stages["evaluate@two-stage"]["loads"] == 1
    sweep = [f"sweep_{stage}@{n}" for n in (7_000, 20_000, 35_000) for stage in ("stage1", "stage2", "evaluate")]
    assert [n for n in stages if n.startswith("sweep")] == sweep  # each point three stages; none at 55,000
    assert not [n for n, s in stages.items() if s["duplicate_of"]]
    assert stages["sweep_stage1@7000"]["train_samples"] == math.ceil(math.ceil(7_000 / 2) / 8) * 3 * 16
    # vqa-rad and validation, each also with blank images
    assert stages["sweep_evaluate@7000"]["answers"] == 2 * (451 + 180) and stages["sweep_evaluate@7000"]["loads"] == 1
    assert not [n for n in stages if n.startswith("control")]  # paper: controls [] (no GPU hours on the blind one)
    assert stages["register"]["loads"] == 0  # the signature only: MLflow loads no model to check an input example
    trained = sum(s["train_samples"] for s in result["stages"])
    assert sum(s["eval_samples"] for s in result["stages"]) < 0.10 * trained  # in-training evaluation under 10 %
    assert result["total_hours"] == round(sum(s["hours"] for s in result["stages"]), 2)
    assert 15 < result["total_hours"] < 25  # issue 17 counted ~35-45 GPU-hours before the sweep and stage-1 fixes
    assert {"path-vqa/test", "roco/train", "vqa-rad/train"} <= set(result["assumed_sizes"])


def test_the_demo_counts_its_blind_control(repo_root, tmp_path):
    from dataclasses import replace

    from med_idefics.data.demo import write_demo_dataset

    params = profile_params(repo_root, "demo", tmp_path)
    small = replace(params.data.demo, n_general_images=2, n_general_validation_images=1, n_caption_train=600,
                    n_caption_validation=2, n_vqa_train_images=20, n_vqa_test_images=4,
                    n_pathology_images=2)  # fmt: skip
    write_demo_dataset(params.data.root, small, params.data.caption_prompt)
    stages = {s["name"]: s for s in estimate(params, REFERENCE_RATES)["stages"]}
    assert stages["control_train@blind"]["train_samples"] == stages["single_stage"]["train_samples"]
    assert stages["control_evaluate@blind"]["answers"] == stages["sweep_evaluate@100"]["answers"] > 0


def test_the_fast_overlay_costs_a_fraction(repo_root, tmp_path):
    paper = estimate(profile_params(repo_root, "paper", tmp_path), REFERENCE_RATES)
    fast = estimate(profile_params(repo_root, "paper-fast", tmp_path), REFERENCE_RATES)
    assert [s["train_samples"] for s in fast["stages"]] == [s["train_samples"] for s in paper["stages"]]
    assert fast["total_hours"] < paper["total_hours"] / 4


def test_rates_interpolate_and_fall_back(tmp_path):
    assert train_rate(REFERENCE_RATES, "4bit", 2, False, False) == (6.1, "")
    middle, note = train_rate(REFERENCE_RATES, "4bit", 8, False, False)
    assert 6.1 < middle < 33.4 and note == ""
    assert train_rate(REFERENCE_RATES, "4bit", 2, True, False) == (6.1, "4bit at 2 as uncached")
    assert train_rate(REFERENCE_RATES, "bf16", 64, True, True)[0] == 64.3  # beyond the measured: the nearest
    assert answer_rate(REFERENCE_RATES, 1) == 0.95 and 0.95 < answer_rate(REFERENCE_RATES, 8) < 45


def test_gpu_check_results_replace_the_reference_rates(repo_root, tmp_path):
    measured = {"source": "gpu_check on a test GPU", "answers": [{"batch": 1, "answers_per_s": 100.0}],
                "train": [{"quantization": "4bit", "micro_batch": 2, "cache": False, "compiled": False,
                           "samples_per_s": 61.0}]}  # fmt: skip
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(measured))
    rates = load_rates(path)
    assert rates["source"] == "gpu_check on a test GPU + reference rates for the rest"
    assert rates["model_load_s"] == REFERENCE_RATES["model_load_s"] and rates["answers"] == measured["answers"]
    assert len(rates["train"]) == len(REFERENCE_RATES["train"])  # the measured row replaced its reference row
    assert train_rate(rates, "4bit", 2, False, False) == (61.0, "")
    params = profile_params(repo_root, "paper", tmp_path)
    faster = estimate(params, rates)
    reference = estimate(params, REFERENCE_RATES)
    assert faster["stages"][0]["hours"] < reference["stages"][0]["hours"] / 5


def test_cli_prints_80_columns_and_json(repo_root, tmp_path, monkeypatch):
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params = apply_profile(params, "paper", repo_root / "configs")
    params["data"]["root"] = str(tmp_path / "data")
    params["data"]["captions"]["train_size"] = None  # all of ROCO train (65,000 assumed): a point of 70,000 is that
    params["sweep"]["sizes"] = [7_000, 70_000]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    table = CliRunner().invoke(main, ["estimate"])
    assert table.exit_code == 0, table.output
    assert max(len(line) for line in table.output.splitlines()) <= 80
    assert "sweep_stage1@70000*" in table.output and "sweep_stage2@70000*" in table.output
    assert "sweep_stage1@7000*" not in table.output and "* repeats stage1 or stage2" in table.output
    result = CliRunner().invoke(main, ["estimate", "--json"])
    data = json.loads(result.output)
    assert set(data) >= {"stages", "total_hours"}
    assert all({"name", "train_samples", "eval_samples", "answers", "hours"} <= set(s) for s in data["stages"])
    assert render(data) == table.output.rstrip("\n")
