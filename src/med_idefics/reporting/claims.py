"""The paper's claims as paired tests on the same questions, for the report (:mod:`med_idefics.stages.report`): each
claim's McNemar / paired-bootstrap comparison (:func:`med_idefics.scoring.metrics.compare`), the Holm correction over
every McNemar p-value the report tests, and the verdict in words. Also what ``reports/paired_tests.json`` holds, and
what the over-seeds table (:mod:`med_idefics.reporting.seeds`) reads back from earlier reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from med_idefics.config import Params
from med_idefics.data.suites import EXPERT_PROMPT, PATH_VQA, SWAP, VQA_RAD
from med_idefics.reporting.results import METRIC_LABELS, MISSING, fmt, markdown_table, predictions_path
from med_idefics.scoring.stats import ALPHA, holm

PAIRED_TESTS_FILE = "paired_tests.json"  # beside the report: the paired tests' numbers, and each claim's verdict
VERDICT_METRIC = "exact_match"  # a claim is reproduced on exact match, the paper's headline metric


@dataclass(frozen=True)
class Claim:
    """A paired test: ``b`` against the reference ``a``, each a (variant, suite), on the same questions."""

    title: str
    a: tuple[str, str]
    b: tuple[str, str]
    expected: str  # the paper's claim, in words
    sign: int = 1  # the sign of b − a that the claim predicts


CLAIMS = (
    Claim("Two-stage vs single-stage", ("single-stage", VQA_RAD), ("two-stage", VQA_RAD), "two-stage is better"),
    Claim("Two-stage vs base", ("base", VQA_RAD), ("two-stage", VQA_RAD), "two-stage is better"),
    Claim("Two-stage vs base, out of domain", ("base", PATH_VQA), ("two-stage", PATH_VQA), "two-stage is better"),
    Claim("Swapped image vs plain (two-stage)", ("two-stage", VQA_RAD), ("two-stage", SWAP), "swapping hurts", -1),
    Claim("Expert vs plain (two-stage)", ("two-stage", VQA_RAD), ("two-stage", EXPERT_PROMPT), "expert helps"),
)

Tested = list[tuple[Claim, dict | str]]  # each claim with its comparison, or why it was not tested


def paired_tests(params: Params, predictions_dir: str | Path) -> Tested:
    """Each claim with :func:`med_idefics.scoring.metrics.compare`'s result (scored as the evaluation scored: the
    paper's way) and ``p_holm`` beside every McNemar ``p_value`` (:func:`adjust_holm`), or why it could not be
    tested."""
    from med_idefics.scoring.metrics import PAPER, compare
    from med_idefics.scoring.predictions import PredictionsError, read_predictions

    results: Tested = []
    for claim in CLAIMS:
        paths = [predictions_path(predictions_dir, *side) for side in (claim.a, claim.b)]
        absent = [str(path) for path in paths if not path.is_file()]
        if absent:
            results.append((claim, f"not evaluated: {', '.join(absent)} missing"))
            continue
        try:
            rows_a, rows_b = (read_predictions(path) for path in paths)
            results.append((claim, compare(rows_a, rows_b, params.eval.seed, params.eval.bootstrap_resamples, PAPER)))
        except PredictionsError as err:
            results.append((claim, f"not comparable: {err}"))
    adjust_holm(results)
    return results


def mcnemar_count(tests: Tested) -> int:
    """How many McNemar p-values the Holm family holds."""
    return sum(_has_p(e) for _, result in tests if not isinstance(result, str) for e in result.values())


def adjust_holm(tests: Tested) -> None:
    """Add ``p_holm`` to every metric entry that has a McNemar ``p_value``: Holm's adjustment over the whole family
    the report tests (every claim × every 0/1 metric), so that a claim is not reproduced by testing many metrics."""
    entries = [
        entry for _, result in tests if not isinstance(result, str) for entry in result.values() if _has_p(entry)
    ]
    for entry, adjusted in zip(entries, holm([entry["p_value"] for entry in entries]), strict=True):
        entry["p_holm"] = adjusted


def _has_p(entry) -> bool:
    return isinstance(entry, dict) and "p_value" in entry


def reproduced(claim: Claim, result: dict | str) -> bool | None:
    """The verdict: the paired exact-match difference has the claimed sign and its Holm-adjusted McNemar p < 0.05;
    None when the claim was not tested."""
    if isinstance(result, str):
        return None
    entry = result[VERDICT_METRIC]
    p_value = entry.get("p_holm", entry.get("p_value"))
    return entry["diff"] is not None and entry["diff"] * claim.sign > 0 and p_value is not None and p_value < ALPHA


def paired_sections(tests: Tested) -> list[str]:
    lines: list[str] = []
    for claim, result in tests:
        (va, sa), (vb, sb) = claim.a, claim.b
        lines += ["", f"### {claim.title}", "", f"B = {vb} on {sb}, A = {va} on {sa}; the paper: {claim.expected}."]
        if isinstance(result, str):
            lines += ["", f"{MISSING} {result}"]
            continue
        rows = []
        for name, label in METRIC_LABELS.items():
            entry = result[name]
            significant = {True: "**yes**", False: "no", None: MISSING}[_significant(entry)]
            diff = _signed(entry["diff"], entry["ci_low"], entry["ci_high"])
            n = result["n_closed"] if "closed" in name else result["n_open"] if name == "open_recall" else result["n"]
            row = [label, str(n), fmt(entry["a"]), fmt(entry["b"]), diff, _p(entry, "p_value"), _p(entry, "p_holm")]
            rows.append([*row, significant])
        lines += ["", f"n = {result['n']} paired questions ({result['n_closed']} closed, {result['n_open']} open).", ""]
        header = ["Metric", "n", "A", "B", "B − A [95% CI]", "McNemar p", "Holm p", "Significant (0.05)"]
        lines += markdown_table(header, rows)
    return lines


def _significant(entry: dict) -> bool | None:
    """McNemar metrics: the Holm-adjusted p < 0.05; the others: the paired-bootstrap interval excludes 0."""
    if "p_holm" in entry:
        return None if entry["p_holm"] is None else entry["p_holm"] < ALPHA
    return entry["significant"]


def claim_verdicts(tests: Tested) -> list[str]:
    """One sentence per claim: reproduced or not (:func:`reproduced`), with the figures."""
    lines = []
    for claim, result in tests:
        if isinstance(result, str):
            lines.append(f"- **Not tested** — {claim.title}: {result}.")
            continue
        em, closed = result["exact_match"], result["closed_accuracy"]
        verdict = "Reproduced" if reproduced(claim, result) else "Not reproduced"
        figures = (
            f"exact match {em['diff']:+.3f} (McNemar p = {_p(em, 'p_value')}, Holm p = {_p(em, 'p_holm')}), "
            f"closed accuracy {closed['diff']:+.3f} (p = {_p(closed, 'p_value')}, Holm p = {_p(closed, 'p_holm')}), "
            f"n = {result['n']}"
        )
        lines.append(f"- **{verdict}** — {claim.title}: the paper says {claim.expected}; here {figures}.")
    return lines


def _p(entry: dict, key: str) -> str:
    return MISSING if entry.get(key) is None else f"{entry[key]:.2g}"


def _signed(diff: float | None, low: float | None, high: float | None) -> str:
    if diff is None:
        return MISSING
    return f"{diff:+.3f}" if low is None else f"{diff:+.3f} [{low:+.2f}, {high:+.2f}]"


def paired_tests_json(tests: Tested) -> list[dict]:
    """Each claim with its sides, ``reproduced`` and either its test (per metric: a, b, diff, interval, p, Holm p,
    significant) or why it was not tested."""
    entries = []
    for claim, result in tests:
        entry = asdict(claim)
        entry["a"], entry["b"] = ({"variant": v, "suite": s} for v, s in (claim.a, claim.b))
        entry["reproduced"] = reproduced(claim, result)
        entries.append(entry | ({"not_tested": result} if isinstance(result, str) else {"test": result}))
    return entries
