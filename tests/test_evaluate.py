"""The evaluate stage on a tiny random Idefics2 and a small demo dataset: batched greedy answers, files, MLflow runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import evaluation_model
from mlflow import MlflowClient

from med_idefics.cli import main
from med_idefics.cli.evaluate import evaluate_command  # registers `evaluate` on main (also imported by cli/__init__)
from med_idefics.config import ConfigError, DemoDataConfig, load_params
from med_idefics.data.collator import build_generation_batch, record_image
from med_idefics.data.demo import write_demo_dataset
from med_idefics.data.schema import split_path
from med_idefics.data.suites import BLANKED, SUITES, VALIDATION, VALIDATION_BLANK, load_suite, suite_splits
from med_idefics.files import file_md5
from med_idefics.reporting.results import headline_metrics, read_run_info, write_run_info
from med_idefics.scoring.metrics import METRICS, summarize
from med_idefics.scoring.predictions import WRITTEN_FIELDS, read_predictions
from med_idefics.stages.evaluate import (
    Target,
    generate_answers,
    output_name,
    resolve_target,
    training_run_of,
)

SMALL = DemoDataConfig(
    seed=3,
    image_size=64,
    n_general_images=2,
    n_general_validation_images=1,
    n_caption_train=4,
    n_caption_validation=1,
    n_vqa_train_images=4,
    n_vqa_test_images=2,
    n_pathology_images=1,
    n_nonsense=2,
)
CI = ("_ci_low", "_ci_high")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, repo_root_module) -> Path:
    """tmp/data/demo (small demo splits), tmp/base (a tiny random Idefics2 + processor, saved like `med-idefics base`)
    and tmp/outputs/two-stage/adapter (a LoRA adapter with non-zero weights)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from med_idefics.data.schema import read_records
    from med_idefics.modeling.tiny import build_tiny

    root = tmp_path_factory.mktemp("eval")
    params = load_params(repo_root_module / "params.yaml")
    write_demo_dataset(root / "data", SMALL, params.data.caption_prompt)
    texts = [f"{r['question']} {r['answer']}" for split in ("train", "test", "pathology", "nonsense")
             for r in read_records(root / "data", "demo", split)]  # fmt: skip
    model, processor = build_tiny(texts, params.model.tiny, seed=0)
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=params.lora.target_modules, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(root / "outputs" / "two-stage" / "adapter")
    return root


@pytest.fixture(scope="module")
def repo_root_module() -> Path:
    return Path(__file__).resolve().parents[1]


def _overrides(root: Path) -> dict:
    return {
        "data.root": str(root / "data"),
        "model.base_dir": str(root / "base"),
        "eval.batch_size": 4,
        "eval.max_new_tokens": 3,
        "eval.bootstrap_resamples": 1000,
        "data.prompt_prefix": "",
        "quantization.load_in_4bit": False,
        "quantization.compute_dtype": "float32",
        "data.vqa.dataset": "demo",
        "data.vqa.eval_split": "test",
        "data.ood.dataset": "demo",
        "data.ood.split": "pathology",
        "data.nonsense.dataset": "demo",
        "data.nonsense.split": "nonsense",
        "data.vqa.validation_fraction": 0.5,  # 4 small training images: 0.1 of them holds no whole image
    }


@pytest.fixture
def params(workspace, repo_root, monkeypatch):
    monkeypatch.chdir(workspace)  # outputs/<variant>/adapter, outputs/predictions and metrics/ are relative
    return load_params(repo_root / "params.yaml", _overrides(workspace))


def test_left_padding_gives_the_same_greedy_answer_alone_and_in_a_batch(params):
    processor, model = evaluation_model(params, None)
    records = sorted(load_suite(params, "vqa-rad").records, key=lambda r: len(r["question"]))
    batch = [records[0], records[-1], records[len(records) // 2]]  # the shortest question is padded in the batch
    padded = build_generation_batch(processor, [record_image(r) for r in batch], [r["question"] for r in batch])
    assert padded["attention_mask"][0, 0] == 0 and padded["attention_mask"][0, -1] == 1  # padded on the left
    # min_new_tokens: a random model must not stop early, so every position of the answer is compared
    together = generate_answers(model, processor, batch, "", batch_size=3, max_new_tokens=6, min_new_tokens=6)
    alone = [generate_answers(model, processor, [r], "", batch_size=1, max_new_tokens=6, min_new_tokens=6)[0]
             for r in batch]  # fmt: skip
    assert together == alone
    assert all(answer.strip() for answer in alone)


def test_evaluate_all_suites_writes_predictions_metrics_and_tracked_runs(params, workspace, repo_root):
    from med_idefics.tracking.store import setup_tracking

    experiment_id = setup_tracking(params)
    client = MlflowClient()
    training_run = client.create_run(experiment_id, run_name="two-stage").info.run_id
    client.set_terminated(training_run)
    write_run_info(workspace / "outputs" / "two-stage", {"variant": "two-stage", "run_id": training_run})

    args = ["evaluate", "--variant", "two-stage", "--suite", "all", "--params", str(repo_root / "params.yaml")]
    for key, value in _overrides(workspace).items():
        args += ["--set", f"{key}={value}"]
    assert main.get_command(None, "evaluate") is evaluate_command
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output

    runs = {r.data.tags["suite"]: r for r in client.search_runs([experiment_id], "tags.variant = 'two-stage'")}
    every = (*SUITES, VALIDATION, VALIDATION_BLANK)  # `all` includes validation where the config carves it
    assert sorted(runs) == sorted(every)
    info = read_run_info(workspace / "metrics" / "two-stage")
    assert info["training_run_id"] == training_run
    assert info["eval_runs"] == {suite: run.info.run_id for suite, run in runs.items()}
    trained = client.get_run(training_run).data.metrics  # the variant's row: every suite's headline numbers
    for suite in every:
        records = load_suite(params, suite).records
        lines = (workspace / "outputs" / "predictions" / "two-stage" / f"{suite}.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        assert all(list(row) == list(WRITTEN_FIELDS) for row in rows)
        assert [row["id"] for row in rows] == [r["id"] for r in records]
        assert [row["answer"] for row in rows] == [r["answer"] for r in records]

        metrics = json.loads((workspace / "metrics" / "two-stage" / f"{suite}.json").read_text())
        run = runs[suite]
        assert metrics["n"] == len(records)
        assert all(isinstance(v, int | float) or v is None for v in metrics.values()), metrics  # a DVC metric
        names = ("abstention_rate", "hallucination_rate") if suite == "med-halt" else METRICS
        assert {name + end for name in names for end in ("", *CI)} <= set(metrics)
        for key in (name + end for name in names for end in ("", *CI) if metrics[name + end] is not None):
            assert run.data.metrics[key] == pytest.approx(metrics[key]), key  # every metric on the nested run
        headline = {f"{suite}/{short}": round(metrics[name], 3) for short, name in headline_metrics(suite).items()}
        assert {key: trained[key] for key in trained if key.startswith(f"{suite}/")} == headline  # values only
        if suite != "med-halt":  # the metrics are those of the predictions file
            rows = read_predictions(workspace / "outputs" / "predictions" / "two-stage" / f"{suite}.jsonl")
            assert summarize(rows, seed=0, resamples=1000) == {k: metrics[k] for k in summarize(rows, 0, 1000)}
            _assert_reliance_and_consistency(workspace, params, suite, rows, metrics)

        assert run.info.status == "FINISHED" and run.info.run_name == f"eval-two-stage-{suite}"
        tags = run.data.tags
        assert tags["training_run_id"] == training_run == tags["mlflow.parentRunId"]
        assert tags["precision"] == "float32" and tags["profile"] == params.profile
        assert tags["adapter"] == "outputs/two-stage/adapter"
        logged = {name: metrics[name] for name in names if metrics[name] is not None}
        assert {k: run.data.metrics[k] for k in logged} == pytest.approx(logged)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"predictions", "metrics", "predictions.json"} <= artifacts
        assert [a.path for a in client.list_artifacts(run.info.run_id, "predictions")] == [f"predictions/{suite}.jsonl"]
        table = json.loads(Path(client.download_artifacts(run.info.run_id, "predictions.json")).read_text())
        assert len(table["data"]) == len(records)
        assert {"question", "answer", "prediction", "correct"} <= set(table["columns"])
        correct = [row[table["columns"].index("correct")] for row in table["data"]]
        if suite != "med-halt":  # correct is the paper's exact match, question by question
            assert sum(correct) / len(correct) == pytest.approx(metrics["exact_match"])
        tables = [a for a in json.loads(tags["mlflow.loggedArtifacts"]) if a["type"] == "table"]
        assert tables == [{"path": "predictions.json", "type": "table"}]
        inputs = {(i.dataset.name, i.dataset.digest) for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
        expected = {(f"{d}/{s}", file_md5(split_path(params.data.root, d, s))) for d, s in suite_splits(params, suite)}
        assert inputs == expected


def _assert_reliance_and_consistency(workspace, params, suite: str, rows, metrics) -> None:
    """A blank suite scored against the suite it blanks (asked for in the same call); vqa-rad's rewording pairs (the
    demo's test split has two per image) scored for consistency; no other suite has either."""
    from med_idefics.scoring.consistency import consistency_scores
    from med_idefics.scoring.reliance import reliance_scores

    if suite in BLANKED:
        sighted = read_predictions(workspace / "outputs" / "predictions" / "two-stage" / f"{BLANKED[suite]}.jsonl")
        expected = reliance_scores(sighted, rows, seed=0, resamples=1000)
        assert {k: metrics[k] for k in expected} == expected and expected["image_reliance_p"] is not None
    else:
        assert "image_reliance" not in metrics
    pairs = load_suite(params, suite).pairs
    assert bool(pairs) == (suite == "vqa-rad") and (metrics.get("n_pairs") or 0) == len(pairs)
    if pairs:
        assert len(pairs) == 2 * SMALL.n_vqa_test_images
        expected = consistency_scores(rows, pairs, 0, 1000)
        assert {k: metrics[k] for k in expected} == expected


def test_the_adapter_changes_the_answers(params):
    records = load_suite(params, "vqa-rad").records[:4]

    def answers(target: Target) -> list[str]:
        processor, model = evaluation_model(params, target.adapter_dir)
        return generate_answers(model, processor, records, "", 4, 4, min_new_tokens=4)

    adapter = resolve_target("two-stage")
    assert adapter.adapter_dir == Path("outputs/two-stage/adapter")
    assert answers(adapter) != answers(Target("base"))


def test_missing_adapter_names_the_command_that_makes_it(params):
    with pytest.raises(ValueError, match=r"dvc repro single_stage.*med-idefics train single-stage"):
        resolve_target("single-stage")
    with pytest.raises(ValueError, match=r"two-stage-n500.*med-idefics train"):
        resolve_target("two-stage-n500")
    with pytest.raises(ValueError, match="not found"):
        resolve_target("./nowhere/adapter")
    with pytest.raises(ConfigError, match="--name"):
        resolve_target("base", name="my name")


def test_reference_names_and_training_runs(tmp_path):
    assert output_name("runs:/0123abc/adapter") == "runs-0123abc-adapter"
    assert output_name("models:/med-idefics-vqa@champion") == "models-med-idefics-vqa-champion"
    assert training_run_of("runs:/0123abc/adapter", tmp_path / "adapter") == "0123abc"
    write_run_info(tmp_path, {"run_id": "feed"})
    assert training_run_of("somewhere/adapter", tmp_path / "adapter") == "feed"


def test_a_rerun_of_the_base_stage_leaves_the_base_folder_byte_identical(workspace, repo_root, tmp_path, monkeypatch):
    """The base folder is a DVC output every training and evaluation stage depends on: a rerun of the cheap base
    stage (a new MLflow run) must not change its hash, or DVC reruns every GPU stage after it and the resume
    fingerprint discards their checkpoints. The run record lives beside it (<base_dir>-run/run_info.json)."""
    from med_idefics.files import folder_sha256
    from med_idefics.modeling.loading import base_digest
    from med_idefics.stages.base import build_tracked_base

    monkeypatch.chdir(tmp_path)
    overrides = {"model.base": str(workspace / "base"), "model.base_dir": str(tmp_path / "base")}
    params = load_params(repo_root / "params.yaml", _overrides(workspace) | overrides)
    hashes, digests, runs = [], [], []
    for _ in range(2):
        build_tracked_base(params)
        hashes.append(folder_sha256(tmp_path / "base"))
        digests.append(base_digest(tmp_path / "base"))
        runs.append(read_run_info(tmp_path / "base-run")["run_id"])
    assert hashes[0] == hashes[1] and digests[0] == digests[1]
    assert runs[0] != runs[1]  # two runs, each recorded beside the base, the latest last
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == ["base.json"]


def test_the_base_is_a_tracked_run_that_its_evaluations_attach_to(workspace, repo_root, tmp_path, monkeypatch):
    """`med-idefics base` (here: pointing at a local folder) is the MLflow run `base`, with its provenance; the
    evaluations of `base` nest under it and put their headline numbers on it, as for a training run."""
    from med_idefics.files import folder_sha256
    from med_idefics.stages.base import build_tracked_base
    from med_idefics.stages.evaluate import EvalRequest, evaluate
    from med_idefics.tracking.store import setup_tracking

    monkeypatch.chdir(tmp_path)
    overrides = {"model.base": str(workspace / "base"), "model.base_dir": str(tmp_path / "base")}
    params = load_params(repo_root / "params.yaml", _overrides(workspace) | overrides)
    build_tracked_base(params)
    client, experiment_id = MlflowClient(), setup_tracking(params)
    (base_run,) = client.search_runs([experiment_id], "attributes.run_name = 'base (seed 42)'")
    tags = base_run.data.tags
    assert tags["variant"] == "base" and tags["base.source"] == "local"
    assert tags["base.path"] == str(workspace / "base") and tags["base.sha256"] == folder_sha256(workspace / "base")
    record = {"variant": "base", "source": "local", "run_id": base_run.info.run_id}
    assert read_run_info(tmp_path / "base-run") == record

    request = EvalRequest("base", ["vqa-rad"], predictions_dir=tmp_path / "pred", metrics_dir=tmp_path / "metrics")
    scores = evaluate(params, request)["vqa-rad"].metrics
    (eval_run,) = client.search_runs([experiment_id], "attributes.run_name = 'eval-base-vqa-rad'")
    assert eval_run.data.tags["mlflow.parentRunId"] == base_run.info.run_id
    row = client.get_run(base_run.info.run_id).data.metrics
    assert row["vqa-rad/em"] == round(scores["exact_match"], 3) and "vqa-rad/em_ci_low" not in row
    assert read_run_info(tmp_path / "metrics" / "base")["training_run_id"] == base_run.info.run_id


def test_evaluating_again_what_was_evaluated_changes_nothing(params, tmp_path, monkeypatch):
    """After `dvc pull` a clone has the outputs and the store has their runs: evaluating again answers the same, so
    it keeps the recorded evaluation run — no second run, run_info.json byte-identical, nothing for DVC to redo. An
    evaluation whose recorded run is not in this store (another server), or that answers otherwise, is a new run."""
    from med_idefics.stages.evaluate import EvalRequest, evaluate
    from med_idefics.tracking.store import setup_tracking

    request = EvalRequest("two-stage", ["vqa-rad"], predictions_dir=tmp_path / "pred", metrics_dir=tmp_path / "m")
    evaluate(params, request)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    recorded = read_run_info(tmp_path / "m" / "two-stage")["eval_runs"]["vqa-rad"]
    client, experiment_id = MlflowClient(), setup_tracking(params)

    evaluate(params, request)
    assert {p: p.read_bytes() for p in files} == before
    assert [r.info.run_id for r in client.search_runs([experiment_id], "tags.variant = 'two-stage'")] == [recorded]

    store = tmp_path / "other-store" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    evaluate(params, request)  # the recorded run means nothing in this store
    (elsewhere,) = MlflowClient().search_runs([setup_tracking(params)], "tags.variant = 'two-stage'")
    assert read_run_info(tmp_path / "m" / "two-stage")["eval_runs"]["vqa-rad"] == elsewhere.info.run_id != recorded

    fewer_tokens = replace_eval(params, max_new_tokens=1)
    evaluate(fewer_tokens, request)  # other answers: a new evaluation
    runs = MlflowClient().search_runs([setup_tracking(params)], "tags.variant = 'two-stage'")
    latest = read_run_info(tmp_path / "m" / "two-stage")["eval_runs"]["vqa-rad"]
    assert len(runs) == 2 and latest != elsewhere.info.run_id


def replace_eval(params, **changes):
    import copy
    from dataclasses import replace

    changed = copy.deepcopy(params)
    changed.eval = replace(changed.eval, **changes)
    return changed
