"""The paper's metrics reproduce every row of the paper's own published result files (csbrendan/CS231N RESULTS/).

The files live outside the repository, in ../shared/reference/cs231n-results (never copied in).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED_REFERENCE

from med_idefics.scoring.metrics import compare, score_rows
from med_idefics.scoring.predictions import PredictionsError, read_predictions

RESULTS = SHARED_REFERENCE / "cs231n-results"
# eval_fake_questions_results.json: the paper's five hand-written nonsense questions with the model's answers and no
# ground truth ({fake_question, predicted_answer}) — nothing to score, so it is not one of the scored files.
UNSCORED = "eval_fake_questions_results.json"
SCORED = sorted(path for path in RESULTS.glob("*_results.json") if path.name != UNSCORED)

# Mean exact match / F1 / BLEU as published (../shared/reference/README.md, three decimals).
PUBLISHED_MEANS = {
    "baseline_results.json": (0.552, 0.380, 0.287),
    "eval_ft_base_only_results.json": (0.525, 0.552, 0.536),
    "eval_full_stage2_results.json": (0.557, 0.579, 0.567),
    "eval_expert_prompt_results.json": (0.570, 0.588, 0.575),
    "swap_eval_full_stage2_results.json": (0.4775, 0.499, 0.489),
    "eval_stage2_path_vqa_results.json": (0.302, 0.317, 0.307),
    "baseline_path_vqa_results.json": (0.290, 0.205, 0.153),
}

pytestmark = pytest.mark.skipif(not RESULTS.is_dir(), reason=f"reference data not present at {RESULTS}")


def test_all_seven_result_files_are_scored():
    assert len(SCORED) == 7
    assert sorted(path.name for path in SCORED) == sorted(PUBLISHED_MEANS)


@pytest.mark.parametrize("path", SCORED, ids=lambda path: path.stem)
def test_rows_and_means_match_the_paper(path):
    stored = json.loads(path.read_text(encoding="utf-8"))
    assert len(stored) == 400
    scores = score_rows(read_predictions(path), mode="paper")

    for index, (row, score) in enumerate(zip(stored, scores, strict=True)):
        assert score.exact_match == float(row["exact_match"]), f"row {index}: {row}"
        assert score.f1 == pytest.approx(row["f1_score"], abs=1e-9), f"row {index}: {row}"
        assert score.bleu == pytest.approx(row["bleu_score"], abs=1e-9), f"row {index}: {row}"

    means = [np.mean([getattr(s, name) for s in scores]) for name in ("exact_match", "f1", "bleu")]
    stored_means = [np.mean([row[key] for row in stored]) for key in ("exact_match", "f1_score", "bleu_score")]
    assert means == pytest.approx(stored_means, abs=1e-9)
    assert means == pytest.approx(PUBLISHED_MEANS[path.name], abs=6e-4)  # published to 3 decimals


def test_the_nonsense_question_file_is_rejected_for_lack_of_ground_truth():
    with pytest.raises(PredictionsError, match=r"row index 0: missing field\(s\) question, answer"):
        read_predictions(RESULTS / UNSCORED)


def test_paired_comparison_on_the_papers_variants():
    full = read_predictions(RESULTS / "eval_full_stage2_results.json")
    swapped = compare(full, read_predictions(RESULTS / "swap_eval_full_stage2_results.json"), seed=0, resamples=1000)
    assert swapped["exact_match"]["diff"] == pytest.approx(0.4775 - 0.5575)
    assert swapped["exact_match"]["significant"] is True  # swapping the image hurts: the model looks at it
    expert = compare(full, read_predictions(RESULTS / "eval_expert_prompt_results.json"), seed=0, resamples=1000)
    assert expert["exact_match"]["diff"] == pytest.approx(0.570 - 0.5575)
    assert expert["exact_match"]["significant"] is False  # the expert prompt's +1.25 points are within noise
