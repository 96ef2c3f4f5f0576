"""Metrics on hand-computed cases, the closed/open split, bootstrap intervals and the paired comparison."""

from __future__ import annotations

import math
import warnings

import pytest

from med_idefics.scoring.metrics import compare, llava_normalize, score_row, summarize
from med_idefics.scoring.predictions import PredictionsError
from med_idefics.scoring.stats import bootstrap_ci, holm, mcnemar_p, paired_bootstrap_ci

RESAMPLES = 1000


def row(answer: str, prediction: str, answer_type: str | None = None, **extra) -> dict:
    base = {"question": f"q about {answer}?", "answer": answer, "prediction": prediction, **extra}
    return base if answer_type is None else {**base, "answer_type": answer_type}


@pytest.mark.parametrize(
    ("answer", "prediction", "exact_match", "f1", "bleu", "recall"),
    [
        ("yes", "yes", 1.0, 1.0, 1.0, 1.0),
        ("Right Upper Lobe", "upper lobe", 0.0, 0.8, math.exp(1 - 3 / 2), 2 / 3),  # P 1, R 2/3; brevity penalty
        # The prediction repeats a token: 2 distinct common tokens over 4 predicted tokens; BLEU clips "left" to 1.
        ("left lung", "left left left lung", 1.0, 2 / 3, 2 / 4, 1.0),
        # The ground truth repeats a token: the *set* of common tokens (2) over the token *lists* (3 each), so even
        # a perfect answer gets F1 2/3 — the paper's formula (a multiset F1 would give 1); BLEU counts both "left"s.
        ("left and left", "left and left", 1.0, 2 / 3, 1.0, 1.0),
        ("no", "normal", 1.0, 0.0, 0.0, 0.0),  # the paper's exact match is a substring test
        ("yes", "yes.", 1.0, 2 / 3, 1 / 2, 1.0),  # nltk splits off the final period
        ("yes", "", 0.0, 0.0, 0.0, 0.0),
        ("pneumothorax", "   ", 0.0, 0.0, 0.0, 0.0),
    ],
)
def test_paper_metrics_on_hand_computed_rows(answer, prediction, exact_match, f1, bleu, recall):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no nltk warnings, even for an empty prediction
        score = score_row(row(answer, prediction))
    assert score.exact_match == exact_match
    assert score.f1 == pytest.approx(f1, abs=1e-12)
    assert score.bleu == pytest.approx(bleu, abs=1e-12)
    assert score.recall == pytest.approx(recall, abs=1e-12)


@pytest.mark.parametrize(
    ("answer", "prediction", "exact_match", "f1"),
    [
        ("no", "normal", 0.0, 0.0),  # whole tokens only
        ("yes", "Yes.", 1.0, 1.0),  # punctuation dropped
        ("the left lung", "left lung, clearly", 1.0, 0.8),  # articles dropped: P 2/3, R 1
        ("x-ray", "an x ray", 1.0, 1.0),
    ],
)
def test_strict_mode_text_metrics(answer, prediction, exact_match, f1):
    score = score_row(row(answer, prediction), mode="strict")
    assert (score.exact_match, score.f1) == (exact_match, pytest.approx(f1))


@pytest.mark.parametrize(
    ("answer", "prediction", "paper", "strict"),
    [
        ("no", "normal", 1.0, 0.0),  # the paper finds "no" in "normal", "nodule", "not", "none", "know"
        ("no", "nodule", 1.0, 0.0),
        ("no", "not seen", 1.0, 0.0),
        ("no", "I don't know", 1.0, 0.0),
        ("yes", "yes no", 1.0, 0.0),  # both words: no verdict
        ("no", "yes no", 1.0, 0.0),
        ("yes", "Yes, but no effusion.", 1.0, 0.0),
        ("no", "No.", 1.0, 1.0),
        ("no", "no, none", 1.0, 1.0),
        ("yes", "yes yes", 1.0, 1.0),
        ("yes", "eyes", 1.0, 0.0),  # "yes" inside another word
        ("yes", "there is a mass", 0.0, 0.0),  # neither word
        ("no", "yes", 0.0, 0.0),
        ("left", "left", 1.0, 1.0),  # a closed question whose options are not yes/no: the whole answer must match
        ("left", "Left.", 1.0, 1.0),
        ("left", "left and right", 1.0, 0.0),
        ("MRI", "mri", 1.0, 1.0),
    ],
)
def test_strict_closed_accuracy_against_the_papers_substring_test(answer, prediction, paper, strict):
    rows = [row(answer, prediction, answer_type="closed")]
    for mode in ("paper", "strict", "llava-med"):
        summary = summarize(rows, seed=0, resamples=RESAMPLES, mode=mode)
        assert summary["closed_accuracy_strict"] == strict, mode  # the same in every mode
    assert summarize(rows, seed=0, resamples=RESAMPLES, mode="paper")["closed_accuracy"] == paper
    assert summarize(rows, seed=0, resamples=RESAMPLES, mode="strict")["closed_accuracy"] == strict


def test_answering_yes_no_to_everything_is_perfect_for_the_paper_and_zero_strict():
    rows = [row(answer, "yes no") for answer in ("yes", "no", "yes", "no")]
    summary = summarize(rows, seed=0, resamples=RESAMPLES, mode="paper")
    assert (summary["closed_accuracy"], summary["closed_accuracy_strict"]) == (1.0, 0.0)


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The left lung.", "left lung"),  # articles and periods dropped
        ("3.5 cm", "3.5 cm"),  # a period before a digit stays
        ("Two lesions, one cyst", "2 lesions 1 cyst"),  # number words to digits; a comma touching a space deleted
        ("none", "0"),
        ("x-ray", "x ray"),  # a mark between letters becomes a space
        ("x - ray", "x ray"),  # … and vanishes where it touches a space
        ("1,000 cells (approx)", "1000 cells approx"),  # digit,digit: every listed mark deleted
        ("T2-weighted?", "t2 weighted"),
    ],
)
def test_llava_med_normalization(text, normalized):
    assert llava_normalize(text.lower()) == normalized


@pytest.mark.parametrize(
    ("answer", "prediction", "exact_match", "recall"),
    [
        ("left lung", "lung lung lung", 0.0, 3 / 4),  # repeats count: tp 3, fn 1 (distinct-token recall: 1/2)
        ("left lung", "the left lung.", 1.0, 1.0),
        ("two", "2 lesions", 1.0, 1.0),
        ("no", "normal", 1.0, 0.0),  # LLaVA-Med's closed accuracy is a substring test too
        ("pneumothorax", "", 0.0, 0.0),
    ],
)
def test_llava_med_mode(answer, prediction, exact_match, recall):
    score = score_row(row(answer, prediction), mode="llava-med")
    assert score.exact_match == exact_match and score.recall == pytest.approx(recall)
    assert score.closed == exact_match


def test_llava_med_open_recall_counts_repeated_prediction_words():
    rows = [row("left lung", "lung lung lung", answer_type="open"), row("edema", "edema", answer_type="open")]
    assert summarize(rows, seed=0, resamples=RESAMPLES, mode="llava-med")["open_recall"] == pytest.approx(7 / 8)
    assert summarize(rows, seed=0, resamples=RESAMPLES, mode="strict")["open_recall"] == pytest.approx(3 / 4)


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown scoring mode 'normalized'"):
        score_row(row("yes", "yes"), mode="normalized")


def test_closed_and_open_split_inferred_from_yes_no_answers():
    rows = [row("yes", "yes"), row("no", "yes"), row("no", "no, none"), row("left lung", "lung"), row("edema", "")]
    summary = summarize(rows, seed=0, resamples=RESAMPLES)
    assert (summary["n"], summary["n_closed"], summary["n_open"]) == (5, 3, 2)
    assert summary["closed_accuracy"] == pytest.approx(2 / 3)
    assert summary["open_recall"] == pytest.approx((1 / 2 + 0) / 2)
    assert summary["exact_match"] == pytest.approx(2 / 5)


def test_explicit_answer_type_wins_over_inference():
    # VQA-RAD labels "left or right?" questions closed although their answer is not yes/no.
    rows = [row("left", "left", answer_type="closed"), row("right", "left", answer_type="closed"), row("yes", "yes")]
    summary = summarize(rows, seed=0, resamples=RESAMPLES)
    assert (summary["n_closed"], summary["n_open"]) == (3, 0)
    assert summary["closed_accuracy"] == pytest.approx(2 / 3)
    assert summary["open_recall"] is None
    assert summary["open_recall_ci_low"] is None and summary["open_recall_ci_high"] is None


def test_no_closed_questions_gives_null_closed_accuracy():
    summary = summarize([row("edema", "edema"), row("mass", "a mass")], seed=0, resamples=RESAMPLES)
    assert summary["n_closed"] == 0 and summary["closed_accuracy"] is None
    assert summary["closed_accuracy_ci_low"] is None
    assert summary["open_recall"] == 1.0


def varied_rows(n: int = 40) -> list[dict]:
    answers = ["yes", "no", "left lung", "right upper lobe", "pleural effusion"]
    predictions = ["yes", "no", "lung", "upper lobe", "effusion on the left", "", "no"]
    return [row(answers[i % 5], predictions[(i * 3) % 7]) for i in range(n)]


def test_bootstrap_intervals_contain_the_mean_and_follow_the_seed():
    rows = varied_rows()
    summary = summarize(rows, seed=7, resamples=RESAMPLES)
    for name in ("closed_accuracy_strict", "exact_match", "f1", "bleu", "closed_accuracy", "open_recall"):
        assert summary[f"{name}_ci_low"] <= summary[name] <= summary[f"{name}_ci_high"], name
        assert summary[f"{name}_ci_low"] < summary[f"{name}_ci_high"], name
    assert summarize(rows, seed=7, resamples=RESAMPLES) == summary
    assert summarize(rows, seed=8, resamples=RESAMPLES) != summary


def test_bootstrap_interval_edge_cases():
    assert bootstrap_ci([], seed=0, resamples=RESAMPLES) is None
    assert bootstrap_ci([0.25], seed=0, resamples=RESAMPLES) == (0.25, 0.25)
    assert bootstrap_ci([1.0, 1.0, 1.0], seed=0, resamples=RESAMPLES) == (1.0, 1.0)  # constant: no BCa failure


def test_mcnemar_exact_against_the_binomial_by_hand():
    # 1 question only a gets right, 7 only b, 5 both, 3 neither: p = 2 * (C(8,0) + C(8,1)) / 2**8.
    a = [True] * 1 + [False] * 7 + [True] * 5 + [False] * 3
    b = [False] * 1 + [True] * 7 + [True] * 5 + [False] * 3
    assert mcnemar_p(a, b) == pytest.approx(18 / 256)
    assert mcnemar_p(b, a) == pytest.approx(18 / 256)
    assert mcnemar_p(a, a) == 1.0
    assert mcnemar_p([], []) is None


def test_compare_uses_mcnemar_for_exact_match():
    correct_a = [True] * 1 + [False] * 7 + [True] * 5 + [False] * 3
    correct_b = [False] * 1 + [True] * 7 + [True] * 5 + [False] * 3
    rows_a = [row("yes", "yes" if ok else "no", id=str(i)) for i, ok in enumerate(correct_a)]
    rows_b = [row("yes", "yes" if ok else "no", id=str(i)) for i, ok in enumerate(correct_b)]
    result = compare(rows_a, rows_b, seed=0, resamples=RESAMPLES)
    for name in ("closed_accuracy_strict", "exact_match", "closed_accuracy"):
        assert result[name]["test"] == "mcnemar_exact"
        assert result[name]["p_value"] == pytest.approx(18 / 256)
        assert result[name]["diff"] == pytest.approx(6 / 16)
        assert result[name]["significant"] is False
    assert result["open_recall"]["a"] is None and result["open_recall"]["significant"] is None


def test_paired_bootstrap_detects_a_clearly_better_variant():
    rows_a = [row("pleural effusion", "normal") for _ in range(30)] + [row("mass", "mass") for _ in range(10)]
    rows_b = [row("pleural effusion", "pleural effusion") for _ in range(30)] + [row("mass", "mass")] * 10
    result = compare(rows_a, rows_b, seed=0, resamples=RESAMPLES)
    for name in ("f1", "bleu", "open_recall"):
        assert result[name]["diff"] == pytest.approx(0.75)
        assert 0 < result[name]["ci_low"] <= 0.75 <= result[name]["ci_high"]
        assert result[name]["significant"] is True
    assert result["exact_match"]["p_value"] < 1e-6 and result["exact_match"]["significant"] is True


def test_paired_bootstrap_includes_zero_for_equally_good_variants():
    rows_a = [row("mass", "mass" if i < 20 else "") for i in range(40)]
    rows_b = [row("mass", "" if i < 20 else "mass") for i in range(40)]
    low, high = paired_bootstrap_ci([1.0] * 20 + [0.0] * 20, [0.0] * 20 + [1.0] * 20, seed=0, resamples=RESAMPLES)
    assert low < 0 < high
    result = compare(rows_a, rows_b, seed=0, resamples=RESAMPLES)
    assert result["f1"]["diff"] == 0 and result["f1"]["ci_low"] < 0 < result["f1"]["ci_high"]
    assert result["f1"]["significant"] is False
    identical = compare(rows_a, rows_a, seed=0, resamples=RESAMPLES)
    assert identical["f1"]["ci_low"] == identical["f1"]["ci_high"] == 0
    assert identical["exact_match"]["p_value"] == 1.0


def test_compare_matches_rows_by_id_in_any_order():
    rows_a = [row(a, p, id=f"q{i}") for i, (a, p) in enumerate([("yes", "yes"), ("mass", "no"), ("no", "no")])]
    rows_b = [row(a, p, id=f"q{i}") for i, (a, p) in enumerate([("yes", "no"), ("mass", "mass"), ("no", "no")])]
    in_order = compare(rows_a, rows_b, seed=0, resamples=RESAMPLES)
    assert compare(rows_a, rows_b[::-1], seed=0, resamples=RESAMPLES) == in_order
    assert in_order["exact_match"]["a"] == pytest.approx(2 / 3) and in_order["open_recall"]["b"] == 1.0


def test_compare_refuses_different_questions():
    rows_a = [row("yes", "yes"), row("no", "no")]
    with pytest.raises(PredictionsError, match="row 1: the two prediction sets differ in question"):
        compare(rows_a, [rows_a[0], {**rows_a[1], "question": "another?"}], seed=0, resamples=RESAMPLES)
    with pytest.raises(PredictionsError, match=r"differ in size \(2 vs 1 rows\)"):
        compare(rows_a, rows_a[:1], seed=0, resamples=RESAMPLES)
    with_ids = [{**r, "id": str(i)} for i, r in enumerate(rows_a)]
    with pytest.raises(PredictionsError, match=r"id\(s\) \['1'\] .* missing from the second"):
        compare(with_ids, [with_ids[0], {**with_ids[1], "id": "9"}], seed=0, resamples=RESAMPLES)
    with pytest.raises(PredictionsError, match="id '0' appears twice"):
        compare(with_ids, [with_ids[0], with_ids[0]], seed=0, resamples=RESAMPLES)


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 of 4: x4, x3, x2, x1, each at least the one before, at most 1
    assert holm([0.01, 0.04, 0.03, None, 0.005]) == pytest.approx([0.03, 0.06, 0.06, None, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0] and holm([]) == [] and holm([None]) == [None]
    assert holm([0.04]) == [0.04]  # one test: nothing to correct
