"""Stage: promotion. The alias ``registry.alias`` (champion) of ``registry.model_name`` moves only on evidence.

The candidates are the versions whose logged model carries ``registry.metric`` on ``registry.suite`` (the validation
split by default; ``validation/closed``, :func:`med_idefics.tracking.registry.evidence`, as ``register`` logs it) — a
version without evaluation metrics never is one. :func:`decide` applies these rules in order, and the decision
names the one that decided (``rule``):

- ``no-evidence``: no version has the metric; nothing moves.
- ``answers-without-looking``: the gate (:func:`med_idefics.scoring.reliance.gate`). A candidate whose strict closed
  accuracy on ``registry.suite`` does not drop on the same questions with blank images (its blank twin, e.g.
  ``validation-blank``) by at least ``registry.min_image_reliance`` with McNemar p < 0.05 — or was never scored so —
  is registered but never promoted; the rule decides when one of them scored best. Every refused version is told so
  (its ``promotion.*`` tags and description, stating both accuracies and p) on every promotion. The champion itself is
  not gated (it is kept, not promoted): its numbers are in the decision too.
- ``uncommitted``: versions made from uncommitted work (:func:`med_idefics.tracking.provenance.uncommitted`: in a DVC
  experiment not yet applied and committed, from a dirty tree, outside git) are registered but left out, unless
  ``registry.allow_uncommitted`` (``promote --allow-uncommitted``); the rule decides when one of them scored best.
- ``no-champion``: there is no champion yet; the best candidate becomes it.
- ``already-champion``: the best candidate is the champion.
- ``champion-unevaluated``: the champion has no evidence on the suite; the best candidate replaces it.
- ``significant`` / ``not-significant`` / ``no-paired-test``: with ``registry.require_significance`` (the default), the
  best candidate replaces the champion only when the paired test of :func:`med_idefics.scoring.metrics.compare` on the
  two versions' predictions (McNemar for closed accuracy) says it is better, p < 0.05; ``better-score`` without it.

Ties keep the champion, else the earliest version. The decision — both sides' scores, commit, dirty state and DVC
experiment, the p-value, every candidate — is ``promotion.json`` in an MLflow run ``promote``; the chosen version gets
five tags (``promotion.status``, ``.outcome``, ``.rule``, ``.p_value``, ``.run_id``) and the decision in words as the
second paragraph of its description (a champion that stays one with no challenger keeps the record of how it became
one). It is a function of the registry's contents, so concurrent promotions agree; the alias is set before any tag,
registry writes are retried when a concurrent writer races them, and every run re-derives the ``promotion.status``
tags from where the alias points.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from med_idefics.config import ConfigError, Params
from med_idefics.reporting.results import CI_SUFFIXES, metric_key
from med_idefics.reporting.results import PREDICTIONS_DIR as _PREDICTIONS
from med_idefics.tracking import registry
from med_idefics.tracking.provenance import NONE, SOURCE_TAGS, uncommitted
from med_idefics.tracking.registry import PROMOTION_MARK, retry_write, set_version_tag, versions

BLIND_RULE = "answers-without-looking"
REFUSED = "refused"  # promotion.outcome and .status of a version the gate refused
PREDICTIONS_DIR = Path(_PREDICTIONS)

PROMOTED, KEPT, NO_CANDIDATE = "promoted", "kept", "no-candidate"
CHAMPION_STATUS = "champion"
ALPHA = 0.05  # med_idefics.scoring.metrics' significance level, which `significant` in its paired tests is computed at


@dataclass(frozen=True)
class Candidate:
    version: str
    variant: str
    value: float
    ci_low: float | None
    ci_high: float | None
    eval_run_id: str | None
    git_commit: str
    git_dirty: str
    dvc_exp_name: str
    gate: dict = field(default_factory=dict)  # scoring.reliance.gate: with/without image, reliance, p, looks, reason

    @property
    def uncommitted(self) -> str | None:
        return uncommitted(asdict(self))

    @property
    def looks(self) -> bool:
        return bool(self.gate.get("looks"))


def blank_twin(params: Params) -> str:
    """The blank suite of ``registry.suite``, on which the gate checks that a candidate looks at the image."""
    from med_idefics.data.suites import BLANKED

    twins = {sighted: blank for blank, sighted in BLANKED.items()}
    if params.registry.suite not in twins:
        raise ConfigError(
            f"registry.suite is {params.registry.suite}, which has no blank suite for promotion's image gate; promote "
            f"on {' or '.join(twins)}"
        )
    return twins[params.registry.suite]


def candidate(client, model_version, params: Params) -> Candidate | None:
    """The version's evidence on ``registry.suite``/``registry.metric``, its gate (its blank twin's scores) and where
    it was made, or None when it has no evidence: its logged model's metric, else (a metric register does not log
    there, ``--set registry.metric=closed_accuracy``) the full scores in its source run."""
    from med_idefics.scoring.reliance import gate

    suite, metric = params.registry.suite, params.registry.metric
    evidence = registry.evidence(client, model_version)
    value, low, high = (evidence.value(suite, metric, suffix) for suffix in ("", *CI_SUFFIXES))
    if value is None:
        scores = registry.full_scores(model_version, suite)
        value, low, high = (registry.number(str(scores.get(metric + suffix))) for suffix in ("", *CI_SUFFIXES))
    if value is None:
        return None
    tags = model_version.tags
    blank = registry.full_scores(model_version, blank_twin(params))
    return Candidate(str(model_version.version), tags.get("variant", "?"), value, low, high,
                     evidence.eval_runs.get(suite), *(tags.get(k, NONE) for k in SOURCE_TAGS),
                     gate(blank, params.registry.min_image_reliance, suite))  # fmt: skip


def promote(
    params: Params, predictions_dir: Path = PREDICTIONS_DIR, dvc_stage: str | None = None, dry_run: bool = False
) -> dict[str, Any]:
    """Move ``registry.alias`` as the rules say; returns the decision.

    ``dry_run``: decide and return the decision, but move no alias, write no tag and start no run."""
    import mlflow
    from mlflow import MlflowClient

    from med_idefics.tracking.runs import tracked_run
    from med_idefics.tracking.store import setup_tracking

    check_selection_suite(params)
    blank_twin(params)
    setup_tracking(params)
    client, reg = MlflowClient(), params.registry
    registered = versions(client, reg.model_name)
    found = (candidate(client, v, params) for v in registered)
    candidates = sorted(filter(None, found), key=_version_number)
    decision = decide(candidates, _alias_target(client, reg.model_name, reg.alias), params, Path(predictions_dir))
    if dry_run:
        return decision | {"dry_run": True, "run_id": None, "champion_after": decision["champion_before"]}
    run_tags = {
        "model_name": reg.model_name,
        "alias": reg.alias,
        "outcome": decision["outcome"],
        "rule": decision["rule"],
    }
    with tracked_run(params, "promote", run_tags, dvc_stage=dvc_stage) as run:
        decision["run_id"] = run.info.run_id if run is not None else None
        if decision["outcome"] == PROMOTED:
            retry_write(client.set_registered_model_alias, reg.model_name, reg.alias, decision["chosen"])
        decision["champion_after"] = _alias_target(client, reg.model_name, reg.alias)
        _record(client, reg.model_name, registered, decision)
        if run is not None:
            mlflow.log_dict(decision, "promotion.json")
    return decision


def check_selection_suite(params: Params) -> None:
    """Promotion ranks on ``registry.suite``; the ``validation`` suite exists only when the config carves one."""
    from med_idefics.data.suites import VALIDATION, has_validation

    if params.registry.suite == VALIDATION and not has_validation(params):
        raise ConfigError(
            f"registry.suite is {VALIDATION}, but data.vqa.validation_fraction is 0: there is no validation split to "
            "choose a model on. Set data.vqa.validation_fraction > 0 (e.g. 0.1) and rerun training and evaluation."
        )


def decide(candidates: list[Candidate], champion: str | None, params: Params, predictions_dir: Path) -> dict:
    """The decision as a JSON-able dict: ``outcome`` (promoted, kept, no-candidate), ``rule`` (see the module
    docstring), ``chosen`` (the version that is or becomes champion, or the challenger that was refused),
    ``reason``, ``challenger`` and ``champion`` (each side's evidence, provenance and image gate), ``p_value``,
    ``left_out`` (uncommitted), ``refused`` (by the image gate, each with why)."""
    reg = params.registry
    incumbent = next((c for c in candidates if c.version == champion), None)
    refused = [c for c in candidates if not c.looks and c is not incumbent]
    held_back = [c for c in candidates if c.uncommitted and c is not incumbent and not reg.allow_uncommitted
                 and c not in refused]  # fmt: skip
    pool = [c for c in candidates if c not in held_back and c not in refused]
    best = max(pool, key=lambda c: (c.value, c is incumbent, -_version_number(c))) if pool else None
    better_refused = [c for c in refused if best is None or c.value > best.value]
    better_held_back = [c for c in held_back if best is None or c.value > best.value]
    decision: dict[str, Any] = {
        "model_name": reg.model_name, "alias": reg.alias, "suite": reg.suite, "metric": reg.metric,
        "require_significance": reg.require_significance, "allow_uncommitted": reg.allow_uncommitted,
        "champion_before": champion, "candidates": [asdict(c) for c in candidates], "test": None, "p_value": None,
        "champion": asdict(incumbent) if incumbent else None, "challenger": None,
        "left_out": [asdict(c) | {"why": c.uncommitted} for c in held_back],
        "refused": [asdict(c) | {"why": c.gate.get("reason")} for c in refused],
        "min_image_reliance": reg.min_image_reliance,
    }  # fmt: skip

    def outcome(result: str, rule: str, chosen: Candidate | None, reason: str) -> dict:
        if chosen is not None and chosen is not incumbent:
            decision["challenger"] = asdict(chosen)
        return decision | {"outcome": result, "rule": rule, "chosen": chosen.version if chosen else champion,
                           "reason": reason}  # fmt: skip

    if not candidates:
        where = metric_key(reg.suite, reg.metric)
        reason = f"no version has {reg.metric} on {reg.suite} ({where}): register evaluated variants first"
        return outcome(NO_CANDIDATE, "no-evidence", None, reason)
    stays = f"{reg.alias} stays version {champion}" if champion else f"no version becomes {reg.alias}"
    better_left_out = better_refused + better_held_back
    if better_left_out and (best is None or best is incumbent):  # the one that scored best says why nothing moves
        top = max(better_left_out, key=lambda c: (c.value, -_version_number(c)))
        if top in refused:
            reason = f"{_label(top, reg.metric)} scores best, but {top.gate['reason']}; {stays}"
            return outcome(KEPT, BLIND_RULE, top, reason)
        reason = (f"{_label(top, reg.metric)} scores best but was {top.uncommitted}; {stays}. Apply and commit the "
                  "work, register it again (`med-idefics register`), or promote with --allow-uncommitted")  # fmt: skip
        return outcome(KEPT, "uncommitted", top, reason)
    label = _label(best, reg.metric)
    if champion is None:
        return outcome(PROMOTED, "no-champion", best, f"no {reg.alias} yet; {label}")
    if best is incumbent:
        return outcome(KEPT, "already-champion", best, f"{label} is already {reg.alias}")
    if incumbent is None:
        reason = f"{reg.alias} version {champion} has no {reg.metric} on {reg.suite}; {label}"
        return outcome(PROMOTED, "champion-unevaluated", best, reason)
    test = paired_test(incumbent, best, params, predictions_dir)
    decision |= {"test": test, "p_value": test.get("p_value")}
    against = f"{label} beats {reg.alias} version {champion} ({incumbent.value:.4f})"
    if not reg.require_significance:
        return outcome(PROMOTED, "better-score", best, f"{against}; registry.require_significance is off")
    if test.get("significant") is None:
        why = f"{against}, but the paired test was not possible: {test.get('error', 'no paired questions')}"
        return outcome(KEPT, "no-paired-test", best, why)
    if not (test["significant"] and test.get("diff", 0) > 0):
        why = f"{against}, but not significantly ({test.get('test')} p={_fmt(test.get('p_value'))}; p < {ALPHA} needed)"
        return outcome(KEPT, "not-significant", best, why)
    return outcome(PROMOTED, "significant", best, f"{against}, {test.get('test')} p={_fmt(test.get('p_value'))}")


def paired_test(incumbent: Candidate, challenger: Candidate, params: Params, predictions_dir: Path) -> dict:
    """:func:`med_idefics.scoring.metrics.compare` of the two evaluations' predictions on ``registry.metric`` (McNemar
    for closed accuracy and exact match): ``a``, ``b``, ``diff``, its interval, ``p_value``, ``significant``; or
    ``{"error": why}`` when there is nothing to pair."""
    from med_idefics.scoring.metrics import compare
    from med_idefics.scoring.predictions import PredictionsError

    suite, metric = params.registry.suite, params.registry.metric
    try:
        rows = [_predictions(c, suite, predictions_dir) for c in (incumbent, challenger)]
        missing = [c.version for c, r in zip((incumbent, challenger), rows, strict=True) if r is None]
        if missing:
            return {"error": f"no {suite} predictions found for version(s) {missing}"}
        result = compare(rows[0], rows[1], seed=params.eval.seed, resamples=params.eval.bootstrap_resamples)
    except PredictionsError as err:
        return {"error": str(err)}
    return result.get(metric) or {"error": f"{metric} has no paired test"}


def _predictions(c: Candidate, suite: str, predictions_dir: Path) -> list[dict] | None:
    """The predictions the candidate's evaluation run logged; the local file only when no run is recorded."""
    from med_idefics.scoring.predictions import read_predictions

    if c.eval_run_id:
        import mlflow

        try:
            path = mlflow.artifacts.download_artifacts(run_id=c.eval_run_id, artifact_path=f"predictions/{suite}.jsonl")
        except Exception:  # mlflow raises several types for a missing run or artifact
            return None
        return read_predictions(path)
    local = predictions_dir / c.variant / f"{suite}.jsonl"
    return read_predictions(local) if local.is_file() else None


def _record(client, name: str, registered: list, decision: dict) -> None:
    """``promotion.*`` tags and the decision in words on the chosen version — unless it is the champion and stays
    one with no challenger (``already-champion``, ``no-evidence``): it keeps the record of how it became champion;
    ``promotion.status`` re-derived on every version that claims it, and a replaced champion's description says so."""
    champion, chosen = decision["champion_after"], decision["chosen"]
    tags_of = {str(v.version): v.tags for v in registered}
    stays = chosen == decision["champion_before"] and decision["outcome"] != PROMOTED  # no challenger moved it
    if chosen is not None and not (stays and "promotion.rule" in tags_of.get(chosen, {})):
        tags = {
            "promotion.outcome": decision["outcome"],
            "promotion.rule": decision["rule"],
            "promotion.p_value": _fmt(decision["p_value"]),
            "promotion.run_id": decision["run_id"] or NONE,
        }
        for key, value in tags.items():
            set_version_tag(client, name, chosen, key, value)
        legacy = set(registry.LEGACY_PROMOTION_TAGS) & set(tags_of.get(chosen, {}))
        registry.delete_version_tags(client, name, chosen, legacy)
        _write_paragraph(client, name, chosen, decision_in_words(decision))
        if chosen != champion:
            set_version_tag(client, name, chosen, "promotion.status", "challenger")
    _record_refusals(client, name, registered, decision)
    if champion is not None:
        set_version_tag(client, name, champion, "promotion.status", CHAMPION_STATUS)
    for v in registered:
        if v.tags.get("promotion.status") == CHAMPION_STATUS and str(v.version) != champion:
            set_version_tag(client, name, v.version, "promotion.status", f"replaced by version {champion}")
            replaced = (f"{PROMOTION_MARK}: was {decision['alias']} until promote run `{decision['run_id']}` "
                        f"({_today()}) made version {champion} {decision['alias']}.")  # fmt: skip
            _write_paragraph(client, name, str(v.version), replaced)


def _record_refusals(client, name: str, registered: list, decision: dict) -> None:
    """Each version the gate refused is told so on every promotion: ``promotion.status`` and ``.outcome`` refused,
    its rule, its image-reliance p and the run, and why in words (the chosen one's paragraph is the decision's); a
    version refused before that passes now loses its refused status."""
    refused = {c["version"]: c for c in decision["refused"]}
    for version, c in refused.items():
        if version != decision["chosen"]:
            tags = {
                "promotion.outcome": REFUSED,
                "promotion.rule": BLIND_RULE,
                "promotion.p_value": _fmt(c["gate"].get("p_value")),
                "promotion.run_id": decision["run_id"] or NONE,
            }
            for key, value in tags.items():
                set_version_tag(client, name, version, key, value)
            why = (f"{PROMOTION_MARK}: not promoted by rule `{BLIND_RULE}` (promote run `{decision['run_id']}`, "
                   f"{_today()}): {c['why']}.")  # fmt: skip
            _write_paragraph(client, name, version, why)
        set_version_tag(client, name, version, "promotion.status", REFUSED)
    current = {*refused, decision["chosen"], decision["champion_after"]}  # their status is set here or by _record
    for v in registered:
        if v.tags.get("promotion.status") == REFUSED and str(v.version) not in current:
            registry.delete_version_tags(client, name, v.version, ["promotion.status"])


def decision_in_words(decision: dict, shown: int = 5) -> str:
    """The description's promotion paragraph: outcome, rule, the scores and the p-value (in ``reason``), the best
    ``shown`` candidates, and the promote run that holds them all (promotion.json)."""
    alias, rule, run = decision["alias"], decision["rule"], decision["run_id"]
    if decision["outcome"] == PROMOTED:
        what = f"became {alias}"
    elif decision["chosen"] == decision["champion_after"]:
        what = f"stays {alias}"
    else:
        what = "not promoted"
    ranked = sorted(decision["candidates"], key=lambda c: (-c["value"], int(c["version"])))
    listing = ", ".join(f"version {c['version']} ({c['variant']}) {c['value']:.4f}" for c in ranked[:shown])
    more = f" and {len(ranked) - shown} more" if len(ranked) > shown else ""
    among = f" Candidates on {decision['suite']} {decision['metric']}: {listing}{more}." if ranked else ""
    return f"{PROMOTION_MARK}: {what} by rule `{rule}` (promote run `{run}`, {_today()}): {decision['reason']}.{among}"


def _write_paragraph(client, name: str, version: str, paragraph: str) -> None:
    description = client.get_model_version(name, version).description
    registry.set_description(client, name, version, registry.with_promotion(description, paragraph))


def _today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def describe(decision: dict) -> list[str]:
    """What ``med-idefics promote`` prints: the outcome, the rule that decided and why; then the evidence of each
    side (score, commit, dirty state, DVC experiment) and the p-value."""
    lines = [f"{decision['outcome']} by rule {decision['rule']}: {decision['reason']}"]
    for side in ("challenger", "champion"):
        c = decision.get(side)
        if c:
            where = f"commit {c['git_commit'][:8]}, dirty {c['git_dirty']}, DVC experiment {c['dvc_exp_name']}"
            lines.append(
                f"  {side}: version {c['version']} ({c['variant']}) {decision['metric']} {c['value']:.4f}; {where}"
            )
    if decision["test"]:
        lines.append(f"  paired test: {decision['test'].get('test', 'none')} p={_fmt(decision['p_value'])}")
    lines += [f"  left out: version {c['version']} ({c['variant']}) {c['value']:.4f}, {c['why']}" for c in
              decision["left_out"]]  # fmt: skip
    lines += [f"  refused ({BLIND_RULE}): version {c['version']} ({c['variant']}): {c['why']}" for c in
              decision["refused"]]  # fmt: skip
    return lines


def _label(c: Candidate, metric: str) -> str:
    return f"version {c.version} ({c.variant}) {metric} {c.value:.4f}"


def _alias_target(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:  # no such alias, or no such registered model yet
        return None


def _version_number(c: Candidate) -> int:
    return int(c.version)


def _fmt(value: float | None) -> str:
    return NONE if value is None else f"{value:.4g}"
