"""After `make demo`: the variants can be compared where researchers look — the MLflow store the pipeline logged to
(`mlflow.db` at the repo root, or the server `$MLFLOW_TRACKING_URI` names) and `dvc exp show`. Each evaluated variant
is one MLflow row (its training run, or the base's run) carrying the headline metrics with their intervals; evaluation
runs keep one predictions table each; datasets are logged inputs; the report run holds files, not dozens of metrics;
DVC declares only numbers as metrics. Marked `demo` (deselected by `make test`: a fresh clone has no pipeline
outputs); a missing output fails, naming the command that makes it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from med_idefics.config import load_params
from med_idefics.data.schema import split_path
from med_idefics.data.suites import suite_splits
from med_idefics.files import file_md5
from med_idefics.reporting.results import CI_SUFFIXES, base_run_folder, headline_metrics, read_json, read_run_info
from med_idefics.tracking.runs import seeded_run_name
from med_idefics.tracking.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, resolve_tracking_uri, sqlite_file

pytestmark = pytest.mark.demo
HEADLINE = "closed"  # results.HEADLINE: strict closed accuracy


@pytest.fixture(scope="module")
def root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params(root):
    return load_params(root / "params.yaml")


@pytest.fixture(scope="module")
def client(params) -> MlflowClient:
    """The store the pipeline logged to: params mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else mlflow.db."""
    uri = resolve_tracking_uri(params)
    db = sqlite_file(uri)
    assert db is None or db.is_file(), f"{db} missing: run `make demo` first"
    return MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def experiment(client, params):
    found = client.get_experiment_by_name(params.mlflow.experiment)
    assert found is not None, f"no experiment {params.mlflow.experiment!r}: run `make demo` first"
    return found


@pytest.fixture(scope="module")
def variants(root) -> dict[str, dict]:
    """Evaluated variant → its metrics/<variant>/run_info.json."""
    found = {path.parent.name: read_run_info(path.parent) for path in (root / "metrics").glob("*/run_info.json")}
    assert {"base", "single-stage", "two-stage"} <= set(found), f"evaluated: {sorted(found)}; run `make demo`"
    return found


def test_the_experiment_opens_as_model_training(experiment):
    assert experiment.tags.get(EXPERIMENT_KIND_TAG) == EXPERIMENT_KIND


def test_every_variant_is_one_row_with_its_headline_metrics(root, client, experiment, params, variants):
    """Each evaluated variant's training (or base) run: named with its seed, `variant` and `seed` as params, and the
    headline metrics of every suite evaluated as `<suite>/<short>` — values to 3 decimals, no interval bounds (those
    stay on the nested evaluation runs, which hold every metric)."""
    for variant, info in variants.items():
        run_id = info.get("training_run_id")
        assert run_id, f"{variant}: no training (or base) run recorded in metrics/{variant}/run_info.json"
        row = client.get_run(run_id)
        assert row.info.experiment_id == experiment.experiment_id and row.data.tags.get("variant") == variant
        assert row.info.run_name == seeded_run_name(variant, params.seed)
        assert (row.data.params["variant"], row.data.params["seed"]) == (variant, str(params.seed))
        scores = {suite: read_json(root / "metrics" / variant / f"{suite}.json") for suite in info["eval_runs"]}
        expected = {
            f"{suite}/{short}": round(numbers[name], 3)
            for suite, numbers in scores.items()
            for short, name in headline_metrics(suite).items()
            if numbers[name] is not None
        }
        headlines = {key: value for key, value in row.data.metrics.items() if key.split("/", 1)[0] in scores}
        assert headlines == expected, variant
        assert not [key for key in row.data.metrics if key.endswith(CI_SUFFIXES)], variant
        for suite, numbers in scores.items():  # every metric, with its interval, on the nested evaluation run
            nested = client.get_run(info["eval_runs"][suite]).data.metrics
            for name in headline_metrics(suite).values():
                if numbers[name] is not None:
                    assert nested[name] == pytest.approx(numbers[name]) and f"{name}_ci_low" in nested
    # the runs table's search box finds exactly these rows' kind: runs with the headline metric
    query = f"metrics.`vqa-rad/{HEADLINE}` >= 0"
    rows = {r.info.run_id for r in client.search_runs([experiment.experiment_id], query, max_results=1000)}
    assert {info["training_run_id"] for info in variants.values()} <= rows
    assert not {info for v in variants.values() for info in v["eval_runs"].values()} & rows  # never the nested ones


def test_the_base_has_a_run_with_its_provenance(root, client, params, variants):
    run = client.get_run(variants["base"]["training_run_id"])
    assert run.info.run_name == seeded_run_name("base", params.seed) and run.info.status == "FINISHED"
    assert run.data.tags["base.source"] in ("tiny", "hub", "local")
    if run.data.tags["base.source"] == "hub":
        assert run.data.tags["base.hub_id"] == params.model.base and run.data.tags["base.revision"]
    else:
        from med_idefics.files import folder_sha256

        base = Path(run.data.tags.get("base.path") or root / params.model.base_dir)
        assert run.data.tags["base.sha256"] == folder_sha256(base)
    assert read_run_info(base_run_folder(root / params.model.base_dir))["run_id"] == run.info.run_id


def test_training_and_evaluation_runs_log_their_datasets_with_digests(root, client, params, variants):
    def inputs(run_id: str) -> dict[str, str]:
        return {i.dataset.name: i.dataset.digest for i in client.get_run(run_id).inputs.dataset_inputs}

    data = params.data
    for variant in ("single-stage", "two-stage"):
        expected = {f"{data.vqa.dataset}/{split}" for split in (data.vqa.train_split, data.vqa.eval_split)}
        assert set(inputs(variants[variant]["training_run_id"])) == expected, variant
    for variant, info in variants.items():
        for suite, run_id in info["eval_runs"].items():
            splits = suite_splits(params, suite)
            expected = {f"{d}/{s}": file_md5(split_path(root / data.root, d, s)) for d, s in splits}
            assert inputs(run_id) == expected, (variant, suite)


def test_each_evaluation_run_has_one_predictions_table(client, variants):
    for variant, info in variants.items():
        for suite, run_id in info["eval_runs"].items():
            run = client.get_run(run_id)
            tables = [a for a in json.loads(run.data.tags["mlflow.loggedArtifacts"]) if a["type"] == "table"]
            assert tables == [{"path": "predictions.json", "type": "table"}], (variant, suite)
            table = json.loads(Path(client.download_artifacts(run_id, "predictions.json")).read_text())
            assert {"question", "answer", "prediction", "correct"} <= set(table["columns"]), (variant, suite)
            assert len(table["data"]) == int(run.data.metrics["n"]), (variant, suite)


def test_the_report_run_holds_files_not_dozens_of_metrics(client, experiment):
    (report,) = client.search_runs(
        [experiment.experiment_id], "attributes.run_name = 'report'", order_by=["attributes.start_time DESC"],
        max_results=1,
    )  # fmt: skip
    assert len(report.data.metrics) <= 5, sorted(report.data.metrics)
    files = {a.path for a in client.list_artifacts(report.info.run_id)}
    assert {"results.md", "figure2.png", "figure3.png", "paired_tests.json"} <= files


def _exp_show_json(root: Path) -> list[dict]:
    dvc = Path(sys.executable).parent / "dvc"
    done = subprocess.run([str(dvc), "exp", "show", "--json"], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _leaves(node, where: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{where}.{key}" if where else key)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, f"{where}[{index}]")
    else:
        yield where, node


def test_dvc_exp_show_has_one_metrics_file_of_at_most_80_numbers(root):
    """`dvc exp show` stays readable: its metric columns are reports/headline.json's variant.suite.metric numbers —
    at most 80, never a string (the MLflow ids are outputs)."""
    columns, checked = set(), 0
    for experiment in _exp_show_json(root):
        metrics = (experiment.get("data") or {}).get("metrics") or {}
        assert set(metrics) <= {"reports/headline.json"}, sorted(metrics)
        for metrics_file, content in metrics.items():
            leaves = dict(_leaves(content.get("data", {})))
            strings = [f"{metrics_file}:{key} = {value!r}" for key, value in leaves.items() if isinstance(value, str)]
            assert not strings, strings[:10]
            columns |= {f"{metrics_file}:{key}" for key in leaves}
            checked += 1
    assert checked > 0, "dvc exp show listed no metrics files: run `make demo`"
    assert 0 < len(columns) <= 80, len(columns)
    assert "reports/headline.json:two-stage.vqa-rad.closed" in columns


def test_the_demo_ends_with_the_champion_the_promotion_rules_choose(root, client, params):
    """The alias is where `promote` decided (outputs/registry/promotion.json). A store with no champion yet (a fresh
    clone's) ends with one — the best validation score — unless every version came from uncommitted work, which the
    decision then names."""
    decision = read_json(root / "outputs" / "registry" / "promotion.json")
    reg = params.registry
    try:
        champion = str(client.get_model_version_by_alias(reg.model_name, reg.alias).version)
    except MlflowException:
        champion = None
    assert champion == decision["champion_after"], decision["reason"]
    if decision["champion_before"] is None and decision["rule"] != "uncommitted":
        assert decision["rule"] == "no-champion" and champion is not None, decision["reason"]
        best = max(c["value"] for c in decision["candidates"] if c["gate"]["looks"])  # the image gate's refusals aside
        assert decision["challenger"]["value"] == best and decision["chosen"] == champion
    if decision["rule"] == "uncommitted":  # e.g. `make demo` on a tree with uncommitted changes: it says how to go on
        assert "--allow-uncommitted" in decision["reason"] and decision["left_out"], decision["reason"]


def test_each_registered_version_reads_at_a_glance(root, client, params):
    """Each version this demo registered (outputs/registry/versions/<variant>.json) carries at most 15 tags, its
    logged model the headline metrics of its metrics files (and the interval of the one promotion ranks on) with the
    evaluation runs behind them, and a description led by that score; the champion's says why it is champion."""
    from med_idefics.stages.register import METRIC_DIGITS, VERSION_TAGS
    from med_idefics.tracking.registry import evidence, logged_model_id, promotion_paragraph

    reg = params.registry
    records = sorted((root / "outputs" / "registry" / "versions").glob("*.json"))
    assert records, "no registered version: run `make demo`"
    promotion = {"promotion.status", "promotion.outcome", "promotion.rule", "promotion.p_value", "promotion.run_id"}
    for record in records:
        variant, number = read_json(record)["variant"], read_json(record)["version"]
        version = client.get_model_version(reg.model_name, number)
        assert len(version.tags) <= 15 and set(version.tags) <= {*VERSION_TAGS, *promotion}, sorted(version.tags)
        assert version.tags["variant"] == variant and version.tags["seed"] == str(params.seed)
        info = read_run_info(root / "metrics" / variant)
        found = evidence(client, version)
        assert found.eval_runs == {suite: run for suite, run in info["eval_runs"].items() if run}, variant
        expected = {}
        for suite in info["eval_runs"]:
            numbers = read_json(root / "metrics" / variant / f"{suite}.json")
            for short, name in headline_metrics(suite).items():
                if numbers[name] is not None:
                    expected[f"{suite}/{short}"] = round(numbers[name], METRIC_DIGITS)
            if suite == reg.suite:
                for suffix in CI_SUFFIXES:
                    expected[f"{suite}/{HEADLINE}{suffix}"] = round(numbers[f"{reg.metric}{suffix}"], METRIC_DIGITS)
        assert found.metrics == expected, variant
        model = client.get_logged_model(logged_model_id(version))
        assert {m.run_id for m in model.metrics} == {version.run_id}, variant  # the compare view's source runs
        score = round(read_json(root / "metrics" / variant / f"{reg.suite}.json")[reg.metric], 3)
        assert version.description.startswith(f"{variant}, seed {params.seed}: {reg.suite} {HEADLINE} {score:.3f} [")
    refused = {c["version"]: c for c in read_json(root / "outputs" / "registry" / "promotion.json")["refused"]}
    for number, c in refused.items():  # the image gate's refusals say so on the version's page, with both accuracies
        version = client.get_model_version(reg.model_name, number)
        tags = {k: version.tags.get(k) for k in ("promotion.status", "promotion.rule", "promotion.outcome")}
        assert tags == {"promotion.status": "refused", "promotion.rule": "answers-without-looking",
                        "promotion.outcome": "refused"}, (number, tags)  # fmt: skip
        gate = c["gate"]
        numbers = f"{gate['with_image']:.3f} with its images and {gate['without_image']:.3f} with blank ones"
        assert numbers in promotion_paragraph(version.description), version.description
    try:
        champion = client.get_model_version_by_alias(reg.model_name, reg.alias)
    except MlflowException:
        return  # every version uncommitted: test_the_demo_ends_with_the_champion_the_promotion_rules_choose says why
    assert champion.tags["promotion.status"] == "champion"
    assert promotion_paragraph(champion.description).startswith("**Promotion**: "), champion.description
