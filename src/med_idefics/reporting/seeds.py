"""Results over training seeds, read from the MLflow tracking store (not from ``metrics/``, which holds one seed):
``med-idefics compare --from-mlflow`` and the report's "over seeds" section.

Every evaluation run (``eval-<variant>-<suite>``) carries its variant and suite as tags and the resolved config as
params, ``seed`` among them. Runs are grouped by (suite, variant, seed); a rerun replaces an earlier run of the same
group (the latest one counts). Only runs of *this* configuration count — every param but ``seed`` (and the
``mlflow.*`` keys, which say where runs go, not what they are) equal to the current params, and the same data
version where both are known — so that a `dvc exp run -S stage2.lr=…` next to the seeds is not averaged in; runs left
out are counted and said. The claims' verdicts per seed come from the ``report`` runs' ``paired_tests.json``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from med_idefics.config import Params
from med_idefics.reporting.results import headline_metrics

EVAL_RUNS = "attributes.run_name LIKE 'eval-%'"
REPORT_RUNS = "attributes.run_name = 'report'"
# the seed varies by design; mlflow.* says where runs go and cluster.* where jobs run, not what the runs are
IGNORED_PARAMS = ("seed", "mlflow.", "cluster.")


@dataclass
class SeedResults:
    """(suite, variant) → seed → metric → value, and → seed → the evaluation run; what was left out."""

    values: dict[tuple[str, str], dict[int, dict[str, float]]] = field(default_factory=dict)
    runs: dict[tuple[str, str], dict[int, str]] = field(default_factory=dict)
    left_out: int = 0  # finished runs of another configuration or data version
    claims: dict[int, dict[str, bool | None]] = field(default_factory=dict)  # seed → claim title → reproduced

    def seeds(self) -> list[int]:
        return sorted({seed for by_seed in self.values.values() for seed in by_seed} | set(self.claims))


def _config(params: Params) -> dict[str, str]:
    from med_idefics.tracking.runs import param_strings

    return {k: v for k, v in param_strings(params.flat()).items() if not k.startswith(IGNORED_PARAMS)}


def _same_config(run, config: dict[str, str], data_md5: str) -> bool:
    logged = run.data.params
    same_data = data_md5 == "none" or run.data.tags.get("data_md5", "none") in ("none", data_md5)
    return same_data and all(logged.get(key) == value for key, value in config.items())


def _seed(run) -> int | None:
    try:
        return int(run.data.params["seed"])
    except (KeyError, ValueError):
        return None


def collect(params: Params, suites: list[str] | None = None, any_config: bool = False) -> SeedResults:
    """The finished evaluation runs of ``suites`` (default: all) in the configured store, by (suite, variant, seed),
    and the claims' verdicts of the finished ``report`` runs by seed."""
    from mlflow import MlflowClient

    from med_idefics.tracking.provenance import data_md5, find_repo_root
    from med_idefics.tracking.runs import search_all_runs
    from med_idefics.tracking.store import setup_tracking

    experiment_id = setup_tracking(params)
    newest_first = ["attributes.start_time DESC"]
    client = MlflowClient()
    config, md5 = _config(params), data_md5(find_repo_root())
    found = SeedResults()
    for run in search_all_runs(client, experiment_id, EVAL_RUNS, newest_first):
        suite, variant, seed = run.data.tags.get("suite"), run.data.tags.get("variant"), _seed(run)
        if run.info.status != "FINISHED" or None in (suite, variant, seed) or (suites and suite not in suites):
            continue
        if not any_config and not _same_config(run, config, md5):
            found.left_out += 1
            continue
        by_seed = found.values.setdefault((suite, variant), {})
        if seed not in by_seed:  # newest first: an older run of the same seed was replaced by this one
            by_seed[seed] = dict(run.data.metrics)
            found.runs.setdefault((suite, variant), {})[seed] = run.info.run_id
    for run in search_all_runs(client, experiment_id, REPORT_RUNS, newest_first):
        seed = _seed(run)
        if run.info.status != "FINISHED" or seed is None or seed in found.claims:
            continue
        if any_config or _same_config(run, config, md5):
            verdicts = _claims_of(client, run.info.run_id)
            if verdicts is not None:
                found.claims[seed] = verdicts
    return found


def _claims_of(client, run_id: str) -> dict[str, bool | None] | None:
    """claim title → reproduced, from a report run's ``paired_tests.json`` (None when it has none)."""
    from mlflow.exceptions import MlflowException

    from med_idefics.reporting.claims import PAIRED_TESTS_FILE
    from med_idefics.tracking.store import client_settings

    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # one small file per seed: no progress bars on stderr
    with tempfile.TemporaryDirectory() as folder, client_settings(quiet):
        try:
            path = client.download_artifacts(run_id, PAIRED_TESTS_FILE, folder)
            claims = json.loads(Path(path).read_text(encoding="utf-8"))["claims"]
        except (MlflowException, OSError, ValueError, KeyError):
            return None
    return {claim["title"]: claim.get("reproduced") for claim in claims if "title" in claim}


def summary(values: dict[int, dict[str, float]], suite: str) -> dict[str, dict[str, Any]]:
    """Per headline metric (short name): mean, sd (None for one seed), n_seeds and the value of each seed."""
    out = {}
    for short, name in headline_metrics(suite).items():
        by_seed = {seed: metrics[name] for seed, metrics in sorted(values.items()) if metrics.get(name) is not None}
        numbers = list(by_seed.values())
        out[short] = {
            "metric": name,
            "mean": statistics.fmean(numbers) if numbers else None,
            "sd": statistics.stdev(numbers) if len(numbers) > 1 else None,
            "n_seeds": len(numbers),
            "by_seed": by_seed,
        }
    return out


def fmt_mean_sd(entry: dict[str, Any]) -> str:
    """``0.871 ± 0.033 (3)``: mean ± sd over the seeds, and how many; ``—`` without a value."""
    from med_idefics.reporting.results import MISSING

    if entry["mean"] is None:
        return MISSING
    sd = "" if entry["sd"] is None else f" ± {entry['sd']:.3f}"
    return f"{entry['mean']:.3f}{sd} ({entry['n_seeds']})"


def to_json(found: SeedResults, store: str) -> dict[str, Any]:
    """What ``med-idefics compare --from-mlflow --json`` prints."""
    suites: dict[str, dict[str, Any]] = {}
    for (suite, variant), values in sorted(found.values.items()):
        suites.setdefault(suite, {})[variant] = {
            "seeds": sorted(values),
            "runs": {str(seed): run for seed, run in sorted(found.runs[suite, variant].items())},
            "metrics": summary(values, suite),
        }
    claims = {
        title: {"held": sum(bool(v.get(title)) for v in found.claims.values()), "seeds": len(found.claims)}
        for title in dict.fromkeys(t for verdicts in found.claims.values() for t in verdicts)
    }
    return {"store": store, "seeds": found.seeds(), "left_out": found.left_out, "suites": suites, "claims": claims}
