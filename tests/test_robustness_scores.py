"""Image reliance (with the image − without, on the same closed questions) and consistency under rewording, on rows
small enough to count by hand."""

from __future__ import annotations

import pytest
from scipy import stats

from med_idefics.scoring.consistency import consistency_scores, is_right, same_answer
from med_idefics.scoring.predictions import PredictionsError
from med_idefics.scoring.reliance import reliance_scores
from med_idefics.scoring.stats import mcnemar_p


def row(i: int, answer: str, prediction: str, answer_type: str | None = None) -> dict:
    kind = answer_type or ("closed" if answer in ("yes", "no") else "open")
    return {"id": f"q{i}", "question": f"q {i}?", "answer": answer, "answer_type": kind, "prediction": prediction}


def test_image_reliance_counts_what_the_image_was_worth_on_the_closed_questions():
    truths = ["yes", "no"] * 5 + ["left"]  # 10 yes/no questions, 1 open one (not counted)
    sighted = [row(i, t, t if i < 8 else "maybe") for i, t in enumerate(truths)]  # right on 8 of the 10
    blank = [row(i, t, "yes") for i, t in enumerate(truths)]  # "yes" to everything: right on the 5 yes
    scores = reliance_scores(sighted, blank, seed=0, resamples=500)
    assert scores["closed_with_image"] == 0.8 and scores["image_reliance"] == pytest.approx(0.3)
    # discordant: right only with the image on q1 q3 q5 q7 (4), only without on q9 (1): P(X >= 4), X ~ Bin(5, 1/2)
    assert scores["image_reliance_p"] == pytest.approx(6 / 32)
    assert scores["image_reliance_ci_low"] <= 0.3 <= scores["image_reliance_ci_high"]
    assert (scores["yes_rate"], scores["truth_yes_rate"], scores["n_yes_no"]) == (1.0, 0.5, 10)


def test_mcnemar_one_sided_is_half_the_two_sided_when_b_is_better():
    a = [False] * 7 + [True] * 3
    b = [True] * 7 + [False] * 3
    two, one = mcnemar_p(a, b), mcnemar_p(a, b, alternative="greater")
    assert two == pytest.approx(stats.binomtest(7, 10).pvalue) and one == pytest.approx(two / 2)
    assert mcnemar_p(b, a, alternative="greater") == pytest.approx(stats.binomtest(3, 10, alternative="greater").pvalue)


def test_consistency_counts_pairs_whose_answers_agree_and_sets_the_others_apart():
    rows = [
        row(0, "yes", "Yes."), row(1, "yes", "yes, there is"),  # the same verdict: consistent, both right
        row(2, "no", "no"), row(3, "no", "yes"),  # different: right on the original only
        row(4, "left", "left side"), row(5, "left", "right"),  # open: different answers
        row(6, "ct", "mri", "closed"), row(7, "ct", "mri", "closed"),  # the same wrong answer: consistent, wrong
        row(8, "yes", "yes"), row(9, "no", "no"),  # the rewording changed the answer: set apart
    ]  # fmt: skip
    pairs = [("q0", "q1"), ("q2", "q3"), ("q4", "q5"), ("q6", "q7"), ("q8", "q9")]
    scores = consistency_scores(rows, pairs, seed=0, resamples=500)
    assert (scores["n_pairs"], scores["n_pairs_truth_differs"]) == (4, 1)
    assert scores["consistency"] == 0.5 and scores["original_accuracy"] == 0.75
    assert scores["rewording_accuracy"] == 0.25 and scores["both_right"] == 0.25
    assert scores["consistency_ci_low"] <= 0.5 <= scores["consistency_ci_high"]
    assert is_right(row(0, "left", "the left lobe")) and not is_right(row(0, "no", "normal"))
    assert same_answer(row(0, "no", "No."), row(1, "no", "no, none")) and not same_answer(
        row(0, "no", "no"), row(1, "no", "normal")
    )
    with pytest.raises(PredictionsError, match="q11"):
        consistency_scores(rows, [("q0", "q11")], seed=0, resamples=500)
