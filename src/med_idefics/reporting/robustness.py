"""Two questions a reviewer asks of a VQA score, for the report (:mod:`med_idefics.stages.report`): does the variant
look at the image (*Image reliance*: each blank suite against the suite it blanks, :mod:`med_idefics.scoring.reliance`,
and whether two-stage relies on the image more than single-stage and the base), and does it answer a reworded question
the same way (*Consistency under rewording*, :mod:`med_idefics.scoring.consistency`). Every figure has its n and
interval beside it."""

from __future__ import annotations

from pathlib import Path

from med_idefics.config import Params
from med_idefics.data.suites import BLANK, BLANKED, SLAKE, VALIDATION_BLANK, VQA_RAD
from med_idefics.reporting.results import MISSING, VARIANTS, fmt, fmt_metric, markdown_table, ordered, predictions_path
from med_idefics.scoring.consistency import CONSISTENCY_METRICS, N_PAIRS, N_TRUTH_DIFFERS
from med_idefics.scoring.reliance import RELIANCE, RELIANCE_P, WITH_IMAGE, reliance_difference

RELIANCE_CLAIMS = (("two-stage", "single-stage"), ("two-stage", "base"))  # (b, a): does b rely on the image more?
CONSISTENCY_LABELS = {
    "consistency": "Consistent",
    "original_accuracy": "Right (original)",
    "rewording_accuracy": "Right (rewording)",
    "both_right": "Both right",
}


def reliance_table(scores: dict, blank_suite: str) -> list[str]:
    """A row per variant scored on ``blank_suite``: n, strict closed accuracy with and without the image, image
    reliance [95 % CI], its one-sided McNemar p, and the yes-rates under blank images."""
    rows = []
    for variant in ordered({v for v, s in scores if s == blank_suite}, VARIANTS):
        blank = scores.get((variant, blank_suite))
        if not blank or blank.get(RELIANCE) is None:
            continue
        p = MISSING if blank.get(RELIANCE_P) is None else f"{blank[RELIANCE_P]:.2g}"
        yes = f"{fmt_metric(blank, 'yes_rate')} (n = {blank.get('n_yes_no', MISSING)})"
        truth = fmt(blank.get("truth_yes_rate"))
        accuracies = [fmt(blank.get(WITH_IMAGE)), fmt_metric(blank, "closed_accuracy_strict")]
        rows.append([variant, str(blank.get("n_closed", MISSING)), *accuracies, _signed_metric(blank, RELIANCE), p,
                     yes, truth])  # fmt: skip
    if not rows:
        return [f"{MISSING} no variant scored on `{blank_suite}` with its sighted suite yet."]
    header = ["Variant", "n closed", "With image", "Blank", "Image reliance [95% CI]", "McNemar p (one-sided)",
              "Yes-rate, blank", "Truth yes"]  # fmt: skip
    return markdown_table(header, rows)


def reliance_section(params: Params, scores: dict, predictions_dir: str | Path) -> list[str]:
    sighted = BLANKED[BLANK]
    lines = ["", "## Image reliance", ""]
    lines += [
        f"Strict closed accuracy on `{sighted}` with each image, and on the same questions with the image replaced "
        f"by a black one of its size (`{BLANK}`); image reliance is the difference, with its 95 % paired-bootstrap "
        "interval and the exact one-sided McNemar p (does the image help?). A variant that answers as well without "
        "the image is not reading it. "
        "Yes-rate: over the closed questions whose answer is yes or no, how often it answers yes under blank images, "
        "beside how often the truth is yes.",
        "",
    ]
    lines += reliance_table(scores, BLANK)
    lines += ["", "The paper's variants, paired on the same questions (the difference of their image reliances, with "
              "its 95 % paired-bootstrap interval; more when the interval lies above 0):", ""]  # fmt: skip
    lines += _claims(params, predictions_dir)
    gate = params.registry
    lines += ["", f"On `{BLANKED[VALIDATION_BLANK]}`, where promotion's gate looks (a candidate is promoted only when "
              f"its image reliance there is ≥ {gate.min_image_reliance:g} with p < 0.05, "
              "`registry.min_image_reliance`):", ""]  # fmt: skip
    return lines + reliance_table(scores, VALIDATION_BLANK)


def _claims(params: Params, predictions_dir: str | Path) -> list[str]:
    from med_idefics.scoring.predictions import PredictionsError, read_predictions

    lines = []
    for b, a in RELIANCE_CLAIMS:
        paths = [predictions_path(predictions_dir, v, s) for v in (a, b) for s in (BLANKED[BLANK], BLANK)]
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            lines.append(f"- **Not tested** — does {b} rely on the image more than {a}? {', '.join(absent)} missing.")
            continue
        try:
            result = reliance_difference(*(read_predictions(p) for p in paths), params.eval.seed,
                                         params.eval.bootstrap_resamples)  # fmt: skip
        except PredictionsError as err:
            lines.append(f"- **Not tested** — does {b} rely on the image more than {a}? {err}")
            continue
        more = result["ci_low"] is not None and result["ci_low"] > 0
        verdict = "Yes" if more else "Not shown"
        lines.append(
            f"- **{verdict}** — does {b} rely on the image more than {a}? Image reliance {result['b']:+.3f} vs "
            f"{result['a']:+.3f}: {_signed(result['diff'], result['ci_low'], result['ci_high'])}, "
            f"n = {result['n']} closed questions."
        )
    return lines


def consistency_section(scores: dict) -> list[str]:
    lines = ["", "## Consistency under rewording", ""]
    lines += [
        f"The `{VQA_RAD}` questions asked twice, an original and its rewording on the same image (VQA-RAD's "
        "`qid_linked_id` and `phrase_type`; the demo asks two open questions per test image again in other "
        "words), over the pairs whose answers agree: the same answer to both (a yes/no verdict, else the "
        "normalised answer), right on the original, right on the rewording, right on both — each with its 95 % "
        "bootstrap interval over the n pairs.",
        "",
    ]
    rows = []
    for variant in ordered({v for v, s in scores if s == VQA_RAD}, VARIANTS):
        summary = scores.get((variant, VQA_RAD)) or {}
        if summary.get(N_PAIRS):
            left = summary.get(N_TRUTH_DIFFERS, 0)
            n = f"{summary[N_PAIRS]}" + (f" (+{left} whose answers differ)" if left else "")
            rows.append([variant, n, *(fmt_metric(summary, name) for name in CONSISTENCY_METRICS)])
    if rows:
        lines += markdown_table(["Variant", "n pairs", *CONSISTENCY_LABELS.values()], rows)
    else:
        lines.append(f"{MISSING} no rewording pairs in `{VQA_RAD}` (its records carry no `qid_linked_id`: the hub's "
                     "VQA-RAD and the MEVF split have none; the official release does).")  # fmt: skip
    if any(s == SLAKE for _, s in scores):
        lines += ["", "SLAKE marks no rewordings (its Chinese rows are translations into another language, not "
                  "rewordings in one): it has no pairs."]  # fmt: skip
    return lines


def _signed_metric(summary: dict, name: str) -> str:
    return _signed(summary.get(name), summary.get(f"{name}_ci_low"), summary.get(f"{name}_ci_high"))


def _signed(value: float | None, low: float | None, high: float | None) -> str:
    if value is None:
        return MISSING
    return f"{value:+.3f}" if low is None or high is None else f"{value:+.3f} [{low:+.2f}, {high:+.2f}]"
