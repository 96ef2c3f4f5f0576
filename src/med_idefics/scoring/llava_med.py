"""LLaVA-Med's answer normalization and F1/recall, re-implemented from its published evaluation code
(microsoft/LLaVA-Med ``llava/eval/eval_metrics/glossary.py`` and ``evaluate_metrics.py``): the ``llava-med`` scoring
mode of :mod:`med_idefics.scoring.metrics`."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

_LLAVA_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_LLAVA_DIGIT_COMMA = re.compile(r"\d,\d")
_LLAVA_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its point)
_LLAVA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                  "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip


def llava_normalize(text: str) -> str:
    """LLaVA-Med's ``normalize_word``: each of its punctuation marks is deleted where it touches a space (or anywhere,
    once the text holds a digit-comma-digit), else turned into a space; periods not followed by a digit deleted (at
    most 32: its ``re.sub`` receives ``re.UNICODE`` as the count); lowercase words; number words zero to ten (and
    "none") to digits; articles dropped; commas deleted. Its table of apostrophe-less contractions ("dont" → "don't")
    is left out: it changes a score only when a ground truth holds one of those contractions (in either spelling), and
    none of the 41,023 answers of the VQA-RAD, SLAKE (English) and PathVQA releases does."""
    delete_all = bool(_LLAVA_DIGIT_COMMA.search(text))
    out = text
    for mark in _LLAVA_PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space or delete_all else " ")
    out = _LLAVA_PERIOD.sub("", out, count=32)
    words = (_LLAVA_NUMBERS.get(word, word) for word in out.lower().split())
    return " ".join(word for word in words if word not in ("a", "an", "the")).replace(",", "")


def llava_f1_recall(truth_tokens: Sequence[str], pred_tokens: Sequence[str]) -> tuple[float, float]:
    """LLaVA-Med's ``calculate_f1score`` (F1, recall): a true positive counts every occurrence of a shared word in
    the *prediction*, a false negative every occurrence of a missed truth word; (0, 0) for an empty side or no hit."""
    truth, pred = Counter(truth_tokens), Counter(pred_tokens)
    true_pos = sum(n for word, n in pred.items() if word in truth)
    if not truth or not pred or true_pos == 0:
        return 0.0, 0.0
    false_pos = sum(n for word, n in pred.items() if word not in truth)
    false_neg = sum(n for word, n in truth.items() if word not in pred)
    precision, recall = true_pos / (true_pos + false_pos), true_pos / (true_pos + false_neg)
    return 2 * precision * recall / (precision + recall), recall
