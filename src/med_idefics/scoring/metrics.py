"""Answer-level VQA metrics, their means with bootstrap intervals, and the paired comparison of two variants.

Every score JSON has exact match, F1, BLEU, closed accuracy (over closed questions) and open recall (over open
questions), computed by one of three modes, plus ``closed_accuracy_strict``, the same in every mode: the one number
promotion ranks on and the report shows first.

* ``paper`` — the paper's (csbrendan/CS231N; reproduced row for row on its published result files, see
  ``tests/test_conformance.py``): exact match = the lowercased ground truth is a *substring* of the prediction; F1
  over the *sets* of nltk tokens, divided by the token *list* lengths; unigram BLEU without smoothing; closed accuracy
  = exact match over closed questions; open recall = the share of the ground truth's distinct tokens found in the
  prediction. A substring test cannot be trusted on closed questions: "no" is found in "normal", "nodule", "not",
  and the answer "yes no" is right on every yes/no question.
* ``strict`` — SQuAD-style normalization first (lowercase; punctuation to spaces; articles a/an/the dropped;
  whitespace tokens); exact match only for a whole-token run; closed accuracy by :func:`strict_closed_hit`.
* ``llava-med`` — LLaVA-Med's published evaluation (microsoft/LLaVA-Med ``llava/eval/run_eval_batch.py`` with
  ``eval_metrics/``): its normalization (:func:`llava_normalize`: numbers words to digits, articles and periods
  dropped, …); closed accuracy = the normalized truth is a substring of the normalized prediction (every closed
  question counted: the fixed ``run_eval_batch.py``, not ``run_eval.py``, which skipped wrong answers that contain
  "yes" or "no"); open recall = true positives over true positives + false negatives where a true positive counts
  *every* occurrence of a shared word in the prediction (so "lung lung lung" for "left lung" gets 3/4). Exact match
  is the same substring test, F1 LLaVA-Med's, BLEU unigram — over all questions here, where LLaVA-Med reports those
  three over open questions only.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from nltk.tokenize import word_tokenize
from nltk.translate.bleu_score import sentence_bleu

from med_idefics.data.schema import CLOSED, OPEN
from med_idefics.scoring.llava_med import llava_f1_recall, llava_normalize
from med_idefics.scoring.predictions import align_predictions, answer_type_of
from med_idefics.scoring.stats import ALPHA, bootstrap_ci, mcnemar_p, paired_bootstrap_ci

STRICT, PAPER, LLAVA_MED = "strict", "paper", "llava-med"
MODES = (STRICT, PAPER, LLAVA_MED)
CLOSED_STRICT = "closed_accuracy_strict"
METRICS = (CLOSED_STRICT, "exact_match", "f1", "bleu", "closed_accuracy", "open_recall")
BINARY_METRICS = frozenset({CLOSED_STRICT, "exact_match", "closed_accuracy"})
YES_NO = frozenset({"yes", "no"})

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass(frozen=True)
class RowScore:
    answer_type: str  # closed | open
    exact_match: float  # 1.0 or 0.0
    f1: float
    bleu: float
    recall: float  # the mode's open recall of this row (counted over open questions only)
    closed: float  # the mode's closed-accuracy hit, 1.0 or 0.0 (counted over closed questions only)
    closed_strict: float  # :func:`strict_closed_hit`, whatever the mode


def normalize(text: str) -> str:
    text = _PUNCTUATION.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def tokenize(text: str, mode: str = PAPER) -> list[str]:
    if mode == PAPER:
        return word_tokenize(text.lower(), preserve_line=True)
    if mode == STRICT:
        return normalize(text).split()
    if mode == LLAVA_MED:
        return llava_normalize(text.lower()).split()
    raise ValueError(f"unknown scoring mode {mode!r}; choose one of {', '.join(MODES)}")


def contains_answer(truth: str, prediction: str, mode: str = PAPER) -> bool:
    """Exact match. paper: substring test; strict: the truth's tokens as a contiguous token run; llava-med: substring
    test after LLaVA-Med's normalization."""
    if mode == PAPER:
        return truth.lower() in prediction.lower()
    if mode == LLAVA_MED:
        return llava_normalize(truth.lower()) in llava_normalize(prediction.lower())
    truth_tokens, pred_tokens = tokenize(truth, mode), tokenize(prediction, mode)
    width = len(truth_tokens)
    return any(pred_tokens[i : i + width] == truth_tokens for i in range(len(pred_tokens) - width + 1))


def yes_no_verdict(prediction: str) -> str | None:
    """The answer's yes/no: "yes" or "no" when exactly one of the two occurs as a whole word after normalization
    ("No." → no, "no, none" → no); None when neither occurs ("normal", "nodule", "not seen") or both do ("yes no",
    "yes, but no effusion")."""
    found = YES_NO.intersection(normalize(prediction).split())
    return next(iter(found)) if len(found) == 1 else None


def strict_closed_hit(truth: str, prediction: str) -> bool:
    """Strict closed accuracy of one closed question: for a yes/no ground truth, the prediction's
    :func:`yes_no_verdict` equals it; for any other closed ground truth ("left", "MRI": the question offered the
    options), the normalized prediction *is* the normalized truth (no credit for "left and right")."""
    expected = normalize(truth)
    if expected in YES_NO:
        return yes_no_verdict(prediction) == expected
    return normalize(prediction) == expected


def token_f1(truth_tokens: Sequence[str], pred_tokens: Sequence[str]) -> float:
    """The paper's F1: the number of *distinct* common tokens over each side's token *count*."""
    common = len(set(truth_tokens) & set(pred_tokens))
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def token_recall(truth_tokens: Sequence[str], pred_tokens: Sequence[str]) -> float:
    """Open recall of one row (paper and strict modes): the share of distinct ground-truth tokens found in the
    prediction. (LLaVA-Med's own counts repeated prediction words: :func:`llava_f1_recall`.)"""
    truth = set(truth_tokens)
    return len(truth & set(pred_tokens)) / len(truth) if truth else 0.0


def unigram_bleu(truth_tokens: Sequence[str], pred_tokens: Sequence[str]) -> float:
    """nltk sentence BLEU with unigram weights and no smoothing; 0 for an empty side (nltk's value, without asking)."""
    if not truth_tokens or not pred_tokens:
        return 0.0
    return float(sentence_bleu([list(truth_tokens)], list(pred_tokens), weights=(1,)))


def score_row(row: Mapping, mode: str = PAPER) -> RowScore:
    truth, prediction = str(row["answer"]), row["prediction"]
    truth_tokens, pred_tokens = tokenize(truth, mode), tokenize(prediction, mode)
    exact = float(contains_answer(truth, prediction, mode))
    strict = float(strict_closed_hit(truth, prediction))
    if mode == LLAVA_MED:
        f1, recall = llava_f1_recall(truth_tokens, pred_tokens)
    else:
        f1, recall = token_f1(truth_tokens, pred_tokens), token_recall(truth_tokens, pred_tokens)
    return RowScore(
        answer_type=answer_type_of(row),
        exact_match=exact,
        f1=f1,
        bleu=unigram_bleu(truth_tokens, pred_tokens),
        recall=recall,
        closed=strict if mode == STRICT else exact,
        closed_strict=strict,
    )


def score_rows(rows: Iterable[Mapping], mode: str = PAPER) -> list[RowScore]:
    """Per-row scores of ``{question, answer, prediction[, answer_type]}`` rows (answer_type inferred when absent)."""
    return [score_row(row, mode) for row in rows]


def metric_samples(scores: Sequence[RowScore]) -> dict[str, np.ndarray]:
    """Each metric's per-question values; closed accuracy and open recall only over their own questions."""
    closed = np.array([s.answer_type == CLOSED for s in scores], dtype=bool)
    opened = np.array([s.answer_type == OPEN for s in scores], dtype=bool)
    column = {name: np.array([getattr(s, name) for s in scores], dtype=float) for name in _NUMBERS}
    return {
        CLOSED_STRICT: column["closed_strict"][closed],
        **{name: column[name] for name in ("exact_match", "f1", "bleu")},
        "closed_accuracy": column["closed"][closed],
        "open_recall": column["recall"][opened],
    }


_NUMBERS = ("exact_match", "f1", "bleu", "recall", "closed", "closed_strict")  # RowScore's numeric fields


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if values.size else None


def summarize(rows: Sequence[Mapping], seed: int, resamples: int, mode: str = PAPER) -> dict:
    """The score JSON: n, n_closed, n_open and every metric's mean with its 95 % bootstrap interval.

    A metric with no questions (e.g. no closed ones) is None, as are its bounds.
    """
    samples = metric_samples(score_rows(rows, mode))
    summary: dict = {
        "n": len(rows),
        "n_closed": int(samples["closed_accuracy"].size),
        "n_open": int(samples["open_recall"].size),
    }
    for name in METRICS:
        values = samples[name]
        low, high = bootstrap_ci(values, seed, resamples) or (None, None)
        summary.update({name: _mean(values), f"{name}_ci_low": low, f"{name}_ci_high": high})
    return summary


def compare(rows_a: Sequence[Mapping], rows_b: Sequence[Mapping], seed: int, resamples: int, mode: str = PAPER) -> dict:
    """Paired comparison of variant b against variant a on the same questions (matched by id, else by position).

    For each metric: both means, ``diff`` = b - a with its 95 % paired-bootstrap interval, and ``significant``
    (at 5 %): the exact McNemar test for the 0/1 metrics (exact match, closed accuracy), otherwise an interval that
    excludes 0. Raises :class:`~med_idefics.scoring.predictions.PredictionsError` when the questions differ.
    """
    rows_b = align_predictions(rows_a, rows_b)
    samples_a, samples_b = metric_samples(score_rows(rows_a, mode)), metric_samples(score_rows(rows_b, mode))
    result: dict = {
        "n": len(rows_a),
        "n_closed": int(samples_a["closed_accuracy"].size),
        "n_open": int(samples_a["open_recall"].size),
    }
    for name in METRICS:
        a, b = samples_a[name], samples_b[name]
        low, high = paired_bootstrap_ci(a, b, seed, resamples) or (None, None)
        entry = {"a": _mean(a), "b": _mean(b), "diff": _mean(b - a), "ci_low": low, "ci_high": high}
        if name in BINARY_METRICS:
            p_value = mcnemar_p(a.astype(bool), b.astype(bool))
            entry.update(
                test="mcnemar_exact", p_value=p_value, significant=None if p_value is None else p_value < ALPHA
            )
        else:
            entry.update(test="paired_bootstrap", significant=None if low is None else bool(low > 0 or high < 0))
        result[name] = entry
    return result


# --------------------------------------------------------------------------------------------------------------------
# Med-HALT: abstention on nonsense questions

#: Phrases that make an answer an abstention wherever they occur in it: the model declines, says it does not know, or
#: flags the question as invalid. Matched on whole words after :func:`normalize` (so "I don't know." matches
#: "i don't know", and "invalid" never matches inside "invalidated").
ABSTENTION_PHRASES = (
    "do not know", "don't know", "dont know", "idk", "no idea", "not sure", "unsure",
    "invalid", "not a valid", "not valid question", "nonsense", "nonsensical question", "question is nonsensical",
    "does not make sense", "doesn't make sense", "makes no sense", "make no sense", "not make sense",
    "not applicable", "no answer", "unanswerable", "not answerable",
    "not enough information", "insufficient information", "no such", "does not exist", "doesn't exist",
    "not a real", "not real",
)  # fmt: skip
#: "<negation> <verb>": "cannot answer", "unable to determine", "not possible to tell", … — the negation alone is
#: not enough: "malignancy cannot be excluded" is a (hallucinated) finding, not a refusal.
ABSTENTION_NEGATIONS = ("cannot", "can not", "can't", "unable to", "not able to", "not possible to", "impossible to")
ABSTENTION_VERBS = (
    "answer", "be answered", "determine", "be determined", "tell", "be told", "say", "know", "be known",
    "identify", "be identified", "assess", "be assessed", "comment", "provide", "respond",
)  # fmt: skip
#: Answers that abstain only when they are the whole answer ("unknown", but not "mass of unknown origin").
ABSTENTION_ANSWERS = ("unknown", "n/a", "na", "none of the above")


def _phrase_tokens(phrase: str) -> tuple[str, ...]:
    return tuple(normalize(phrase.replace("\u2019", "'")).split())


_ABSTENTION_RUNS = frozenset(
    _phrase_tokens(phrase)
    for phrase in (*ABSTENTION_PHRASES, *(f"{n} {v}" for n in ABSTENTION_NEGATIONS for v in ABSTENTION_VERBS))
)
_ABSTENTION_WHOLE = frozenset(_phrase_tokens(answer) for answer in ABSTENTION_ANSWERS)


def is_abstention(prediction: str) -> bool:
    """The Med-HALT rule: the (extracted) answer declines or flags the question as invalid.

    True when the normalized answer contains one of :data:`ABSTENTION_PHRASES` or a negation + verb pair
    (:data:`ABSTENTION_NEGATIONS` x :data:`ABSTENTION_VERBS`) as a run of whole words, or *is* one of
    :data:`ABSTENTION_ANSWERS`. An answer that plays along (a diagnosis, "yes", "no", "none", a number) is a
    hallucination. Deliberately conservative: a premise rejected in the model's own words ("the liver has no wings")
    counts as a hallucination; the raw generations are kept in the predictions file for a human look.
    """
    tokens = tuple(normalize(prediction.replace("\u2019", "'")).split())
    if tokens in _ABSTENTION_WHOLE:
        return True
    return any(tokens[i : i + len(run)] == run for run in _ABSTENTION_RUNS for i in range(len(tokens) - len(run) + 1))


def summarize_abstention(rows: Sequence[Mapping], seed: int, resamples: int) -> dict:
    """The Med-HALT score JSON: n, n_abstained, abstention_rate and its complement hallucination_rate, each with its
    95 % bootstrap interval (``<name>_ci_low``, ``<name>_ci_high``)."""
    abstained = np.array([is_abstention(row["prediction"]) for row in rows], dtype=float)
    summary: dict = {"n": len(rows), "n_abstained": int(abstained.sum())}
    for name, values in (("abstention_rate", abstained), ("hallucination_rate", 1.0 - abstained)):
        low, high = bootstrap_ci(values, seed, resamples) or (None, None)
        summary.update({name: _mean(values), f"{name}_ci_low": low, f"{name}_ci_high": high})
    return summary
