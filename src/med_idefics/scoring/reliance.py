"""Image reliance: how much of a variant's closed accuracy it owes to the image. A model can score well without
looking — one trained on text alone kept ~81 % of its VQA-RAD score on blank images (arXiv 2603.03437) — so each blank
suite (``blank``, ``validation-blank``: the same questions, black images) is scored against the suite it blanks:

- ``image_reliance`` = strict closed accuracy with the image − without it, on the same closed questions, with its
  95 % paired-bootstrap interval (``_ci_low``/``_ci_high``) and the one-sided exact McNemar p-value
  (``image_reliance_p``: is the image worth anything? A drop is the only alternative that matters, and on a small
  validation split the two-sided test refused variants that clearly look — the demo's single-stage at seed 42,
  +0.175 on 63 closed questions, two-sided p 0.052);
  ``closed_with_image`` beside the blank suite's own ``closed_accuracy_strict``;
- ``yes_rate`` under blank images (with its interval) beside ``truth_yes_rate``, over the ``n_yes_no`` closed
  questions whose answer is yes or no: a variant that answers "yes" whatever it sees shows up.

:func:`gate` is promotion's verdict on those numbers (``registry.min_image_reliance``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from med_idefics.data.schema import CLOSED, YES_NO
from med_idefics.scoring.metrics import CLOSED_STRICT, compare, metric_samples, score_rows, yes_no_verdict
from med_idefics.scoring.predictions import align_predictions, answer_type_of
from med_idefics.scoring.stats import ALPHA, bootstrap_ci, mcnemar_p, paired_bootstrap_ci

RELIANCE, RELIANCE_P, WITH_IMAGE = "image_reliance", "image_reliance_p", "closed_with_image"
YES_RATE, TRUTH_YES_RATE, N_YES_NO = "yes_rate", "truth_yes_rate", "n_yes_no"


def reliance_scores(sighted: Sequence[Mapping], blank: Sequence[Mapping], seed: int, resamples: int) -> dict:
    """What a blank suite's scores add (the module docstring): ``sighted`` and ``blank`` are the predictions of the
    same questions (matched by id) with the image and with a blank one."""
    paired = compare(blank, sighted, seed, resamples)[CLOSED_STRICT]  # b − a: with the image − without
    hits = [metric_samples(score_rows(rows))[CLOSED_STRICT] > 0 for rows in (blank, align_predictions(blank, sighted))]
    scores: dict[str, Any] = {
        WITH_IMAGE: paired["b"],
        RELIANCE: paired["diff"],
        f"{RELIANCE}_ci_low": paired["ci_low"],
        f"{RELIANCE}_ci_high": paired["ci_high"],
        RELIANCE_P: mcnemar_p(*hits, alternative="greater"),
    }
    return scores | yes_rates(blank, seed, resamples)


def yes_rates(rows: Sequence[Mapping], seed: int, resamples: int) -> dict:
    """Over the closed questions whose answer is yes or no: the share answered yes (its interval) and the share whose
    answer is yes."""
    closed = [r for r in rows if answer_type_of(r) == CLOSED and str(r["answer"]).strip().lower() in YES_NO]
    said_yes = np.array([yes_no_verdict(str(r["prediction"])) == "yes" for r in closed], dtype=float)
    truth_yes = [str(r["answer"]).strip().lower() == "yes" for r in closed]
    low, high = bootstrap_ci(said_yes, seed, resamples) or (None, None)
    mean = float(said_yes.mean()) if closed else None
    return {
        N_YES_NO: len(closed),
        YES_RATE: mean,
        f"{YES_RATE}_ci_low": low,
        f"{YES_RATE}_ci_high": high,
        TRUTH_YES_RATE: float(np.mean(truth_yes)) if closed else None,
    }


def reliance_difference(sighted_a, blank_a, sighted_b, blank_b, seed: int, resamples: int) -> dict[str, Any]:
    """Does variant b rely on the image more than variant a? On the same closed questions (matched by id), each
    question's reliance is its strict closed hit with the image minus without; ``a`` and ``b`` their means, ``diff``
    = b − a with its 95 % paired-bootstrap interval, ``n`` the closed questions."""
    aligned = [sighted_a, *(align_predictions(sighted_a, rows) for rows in (blank_a, sighted_b, blank_b))]
    hits = [metric_samples(score_rows(rows))[CLOSED_STRICT] for rows in aligned]
    of_a, of_b = hits[0] - hits[1], hits[2] - hits[3]
    low, high = paired_bootstrap_ci(of_a, of_b, seed, resamples) or (None, None)
    mean_a, mean_b = (float(v.mean()) if v.size else None for v in (of_a, of_b))
    diff = None if mean_a is None else mean_b - mean_a
    return {"a": mean_a, "b": mean_b, "diff": diff, "ci_low": low, "ci_high": high, "n": int(of_a.size)}


def gate(blank_scores: Mapping[str, Any] | None, min_reliance: float, suite: str) -> dict[str, Any]:
    """Promotion's gate on a candidate's blank-suite scores (``blank_scores``, of the blank twin of ``suite``): it
    looks at the image when its closed accuracy drops significantly without it (one-sided McNemar p < 0.05) by at
    least ``min_reliance``. Returns the numbers, ``looks`` and ``reason`` (a sentence stating both accuracies and p)."""
    scores = blank_scores or {}
    found = {
        "with_image": scores.get(WITH_IMAGE),
        "without_image": scores.get(CLOSED_STRICT),
        RELIANCE: scores.get(RELIANCE),
        "ci_low": scores.get(f"{RELIANCE}_ci_low"),
        "ci_high": scores.get(f"{RELIANCE}_ci_high"),
        "p_value": scores.get(RELIANCE_P),
        "n_closed": scores.get("n_closed"),
        "min_image_reliance": min_reliance,
    }
    if any(found[key] is None for key in ("with_image", "without_image", RELIANCE, "p_value")):
        reason = (
            f"it was never scored on {suite} with blank images: evaluate {suite} and its blank twin in one call "
            f"(`med-idefics evaluate --suite {suite},{suite}-blank`) and register it again"
        )
        return found | {"looks": False, "reason": reason}
    looks = found["p_value"] < ALPHA and found[RELIANCE] >= min_reliance
    numbers = (
        f"on {suite} its strict closed accuracy is {found['with_image']:.3f} with its images and "
        f"{found['without_image']:.3f} with blank ones (image reliance {_interval(found)}, one-sided McNemar "
        f"p={found['p_value']:.4g}, n = {found['n_closed']} closed questions)"
    )
    if looks:
        return found | {"looks": True, "reason": f"{numbers}: it looks at the image"}
    needed = f"a drop of at least {min_reliance:g} with p < {ALPHA:g} is needed (registry.min_image_reliance)"
    return found | {"looks": False, "reason": f"{numbers}: not shown to look at the image; {needed}"}


def _interval(found: Mapping[str, Any]) -> str:
    value, low, high = found[RELIANCE], found["ci_low"], found["ci_high"]
    return f"{value:+.3f}" if low is None or high is None else f"{value:+.3f} [{low:+.2f}, {high:+.2f}]"
