"""Consistency under rewording: does a variant answer a question asked in other words the same way? Rewording a
question cost LLaVA-Med ~40 % of its recall (RoMed, arXiv 2508.18687).

Scored on the suite's rewording pairs (:mod:`med_idefics.data.rewordings`: an original and its rewording, same image)
whose ground truths agree once normalised — a rewording that changes the answer ("is the diaphragm obscured?" for "is
it clearly visualized?") cannot be answered the same way, and is counted apart (``n_pairs_truth_differs``). Per pair,
each a 0/1 value whose mean comes with its 95 % bootstrap interval over the ``n_pairs`` pairs:

- ``consistency``: the same answer to both — the same yes/no verdict for a yes/no truth
  (:func:`~med_idefics.scoring.metrics.yes_no_verdict`), else the same normalised answer;
- ``original_accuracy`` and ``rewording_accuracy``: right on the original, on the rewording;
- ``both_right``: right on both.

Right is strict: the yes/no verdict (or the whole normalised answer) of strict closed accuracy on closed questions,
the truth as a whole-token run of the answer on open ones (the ``strict`` scoring mode).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from med_idefics.data.schema import CLOSED
from med_idefics.scoring.metrics import STRICT, YES_NO, contains_answer, normalize, strict_closed_hit, yes_no_verdict
from med_idefics.scoring.predictions import PredictionsError, answer_type_of
from med_idefics.scoring.stats import bootstrap_ci

CONSISTENCY = "consistency"
CONSISTENCY_METRICS = (CONSISTENCY, "original_accuracy", "rewording_accuracy", "both_right")
N_PAIRS, N_TRUTH_DIFFERS = "n_pairs", "n_pairs_truth_differs"


def is_right(row: Mapping) -> bool:
    truth, prediction = str(row["answer"]), str(row["prediction"])
    if answer_type_of(row) == CLOSED:
        return strict_closed_hit(truth, prediction)
    return contains_answer(truth, prediction, STRICT)


def same_answer(a: Mapping, b: Mapping) -> bool:
    """The two predictions say the same: for a yes/no truth the same yes/no verdict ("No." and "no, none" agree), and
    otherwise — or when neither says yes or no — the same normalised text."""
    verdicts = [yes_no_verdict(str(row["prediction"])) for row in (a, b)]
    if normalize(str(a["answer"])) in YES_NO and verdicts != [None, None]:
        return verdicts[0] == verdicts[1]
    return normalize(str(a["prediction"])) == normalize(str(b["prediction"]))


def consistency_scores(rows: Sequence[Mapping], pairs: Sequence[tuple[str, str]], seed: int, resamples: int) -> dict:
    """The scores of the module docstring over ``pairs`` (original id, rewording id) of ``rows`` (predictions with
    ids); a pair missing from ``rows`` raises :class:`PredictionsError`."""
    by_id = {str(row.get("id")): row for row in rows}
    missing = sorted({i for pair in pairs for i in pair if i not in by_id})
    if missing:
        raise PredictionsError(f"rewording pairs name question(s) {missing[:5]} that the predictions do not hold")
    same_truth = [(by_id[o], by_id[r]) for o, r in pairs if normalize(str(by_id[o]["answer"])) ==
                  normalize(str(by_id[r]["answer"]))]  # fmt: skip
    values = {
        CONSISTENCY: [same_answer(o, r) for o, r in same_truth],
        "original_accuracy": [is_right(o) for o, _ in same_truth],
        "rewording_accuracy": [is_right(r) for _, r in same_truth],
        "both_right": [is_right(o) and is_right(r) for o, r in same_truth],
    }
    scores: dict = {N_PAIRS: len(same_truth), N_TRUTH_DIFFERS: len(pairs) - len(same_truth)}
    for name in CONSISTENCY_METRICS:
        sample = np.asarray(values[name], dtype=float)
        low, high = bootstrap_ci(sample, seed, resamples) or (None, None)
        mean = float(sample.mean()) if sample.size else None
        scores.update({name: mean, f"{name}_ci_low": low, f"{name}_ci_high": high})
    return scores
