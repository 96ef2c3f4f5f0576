"""The registry stage: tiny adapters registered into a tmp store, promoted on (fake) evaluation metrics, loaded back by
version and alias, answered through the CLI; secrets never reach the store; concurrent promotions agree."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from conftest import evaluation_model
from mlflow import MlflowClient
from pydicom.data import get_testdata_file

from med_idefics.cli import main
from med_idefics.cli.registry import predict_command  # noqa: F401  (registers the commands on main)
from med_idefics.config import ConfigError, load_params
from med_idefics.data.images import normalize_image, to_png_bytes
from med_idefics.reporting.results import write_run_info
from med_idefics.scoring.predictions import write_predictions
from med_idefics.stages.promote import CHAMPION_STATUS, KEPT, NO_CANDIDATE, PROMOTED, promote
from med_idefics.stages.register import VERSION_TAGS, register, version_metrics
from med_idefics.tracking import registry
from med_idefics.tracking.store import setup_tracking

NAME = "med-idefics-vqa"
SELECTION_SUITE = "validation"  # params registry.suite: promotion never looks at a test suite
FAKE_TOKEN = "hf_FAKEfakeFAKEfake0123456789abcdef"
PROMOTION_TAGS = ("promotion.status", "promotion.outcome", "promotion.rule", "promotion.p_value", "promotion.run_id")
MAX_TAGS = 15  # a version's page reads at a glance: its scores are on its logged model, not in its tags


def make_adapter(folder: Path, base_dir: Path, target_modules: str, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) weights on the tiny base: answers differ from the base's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Idefics2ForConditionalGeneration

    model = Idefics2ForConditionalGeneration.from_pretrained(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def blank_scores(closed_accuracy: float, looks: bool = True) -> dict:
    """``validation-blank.json`` as evaluate writes it beside ``validation.json``: what promotion's image gate reads.
    ``looks``: 0.30 of closed accuracy lost without the images (McNemar p 1e-5), else none (p 1.0)."""
    reliance, p = (0.30, 1e-5) if looks else (0.0, 1.0)
    return {"n": 40, "n_closed": 40, "closed_accuracy_strict": closed_accuracy - reliance,
            "closed_with_image": closed_accuracy, "image_reliance": reliance, "image_reliance_ci_low": reliance - 0.1,
            "image_reliance_ci_high": reliance + 0.1, "image_reliance_p": p}  # fmt: skip


def write_metrics(
    root: Path,
    variant: str,
    closed_accuracy: float,
    eval_run_id: str | None = None,
    test: float | None = None,
    looks: bool = True,
) -> None:
    """``validation.json`` (what promotion ranks on) with ``closed_accuracy``, ``validation-blank.json`` (its image
    gate: :func:`blank_scores`), and ``vqa-rad.json`` (the test split) with ``test`` (default: the same)."""
    folder = root / "metrics" / variant
    folder.mkdir(parents=True, exist_ok=True)
    for suite, value in (("validation", closed_accuracy), ("vqa-rad", closed_accuracy if test is None else test)):
        metrics = {"n": 40, "exact_match": 0.5}
        for name in ("closed_accuracy_strict", "closed_accuracy"):  # promotion ranks on the strict one (params)
            metrics |= {name: value, f"{name}_ci_low": value - 0.1, f"{name}_ci_high": value + 0.1}
        (folder / f"{suite}.json").write_text(json.dumps(metrics))
    (folder / "validation-blank.json").write_text(json.dumps(blank_scores(closed_accuracy, looks)))
    runs = {"validation": eval_run_id, "validation-blank": eval_run_id, "vqa-rad": eval_run_id}
    write_run_info(folder, {"variant": variant, "eval_runs": runs})


@pytest.fixture
def project(tmp_path, repo_root, tiny_base_dir, monkeypatch):
    """A tmp project (the cwd): params.yaml on the tiny base."""

    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["model"]["base_dir"] = str(tiny_base_dir)
    params["eval"] |= {"max_new_tokens": 4, "batch_size": 4, "bootstrap_resamples": 200}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "params.yaml")
    _git(tmp_path, "commit", "-qm", "params")
    return tmp_path


def _git(root: Path, *args: str) -> str:
    import subprocess

    identity = ["-c", "user.email=t@t", "-c", "user.name=t"]
    return subprocess.run(["git", "-C", str(root), *identity, *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def trained(project, tiny_base_dir):
    """Two trained variants with their training summaries (no metrics yet), and a captioning adapter."""
    target_modules = load_params("params.yaml").lora.target_modules
    for seed, variant in enumerate(("single-stage", "two-stage"), start=1):
        make_adapter(project / "outputs" / variant / "adapter", tiny_base_dir, target_modules, seed)
        write_run_info(project / "outputs" / variant, {"variant": variant, "run_id": f"train-{variant}"})
    make_adapter(project / "outputs" / "stage1" / "adapter", tiny_base_dir, target_modules, 0)  # never registered
    return project


def _versions() -> dict[str, object]:
    return {str(v.version): v for v in MlflowClient().search_model_versions(f"name = '{NAME}'")}


def _logged_model(version):
    """The logged model a version was registered from: where its metrics live."""
    return MlflowClient().get_logged_model(registry.logged_model_id(version))


def _assert_reads_at_a_glance(versions) -> None:
    for v in versions:
        assert len(v.tags) <= MAX_TAGS, (v.version, sorted(v.tags))
        assert set(v.tags) <= {*VERSION_TAGS, *PROMOTION_TAGS}, sorted(set(v.tags) - {*VERSION_TAGS, *PROMOTION_TAGS})


def test_register_never_loads_the_model_and_logs_the_signature_only(trained, monkeypatch):
    """An input example makes MLflow load and run the saved model while logging it: for the 8B base that is one more
    16 GB load per variant (six in one process, none freed). Register gives the signature only."""
    from med_idefics.modeling.serving import VqaModel

    loads = []  # MLflow swallows a failed example prediction with a warning: count the loads instead of raising
    monkeypatch.setattr(VqaModel, "load_context", lambda self, context: loads.append(context))
    registrations = register(load_params("params.yaml"))
    assert len(registrations) == 2 and loads == []
    for registration in registrations:
        info = mlflow.models.get_model_info(f"models:/{NAME}/{registration.version}")
        assert info.saved_input_example_info is None
        assert [c.name for c in info.signature.inputs.inputs] == ["image", "question"]
        assert [c.name for c in info.signature.outputs.inputs] == ["answer"]


def test_register_promote_load_and_predict(trained, tiny_base_dir, tmp_path_factory, monkeypatch):
    project = trained
    params = load_params("params.yaml")
    write_metrics(project, "single-stage", 0.60)
    write_metrics(project, "two-stage", 0.75)

    registrations = {r.variant: r for r in register(params)}
    assert set(registrations) == {"single-stage", "two-stage"}  # stage1 (captioning) is not a VQA variant
    versions = _versions()
    assert len(versions) == 2 and all(r.created for r in registrations.values())
    two_version = registrations["two-stage"].version
    two = versions[two_version]
    assert two.tags["variant"] == "two-stage" and two.tags["training_run_id"] == "train-two-stage"
    assert two.tags["seed"] == str(params.seed)  # no training run in this store: the seed DVC trained with
    # The scores: headline metrics (and the selection metric's interval) on the logged model, through the source run
    model = _logged_model(two)
    on_model = {"validation/closed": 0.75, "validation/closed_ci_low": 0.65, "validation/closed_ci_high": 0.85,
                "validation/em": 0.5, "vqa-rad/closed": 0.75, "vqa-rad/em": 0.5}  # fmt: skip
    assert {m.key: m.value for m in model.metrics} == on_model == registrations["two-stage"].metrics
    assert {m.run_id for m in model.metrics} == {two.run_id}
    assert model.tags["validation.eval_run_id"] == "none" and model.tags["vqa-rad.eval_run_id"] == "none"
    run = MlflowClient().get_run(two.run_id)
    assert run.info.run_name == "register-two-stage" and run.data.tags["training_run_id"] == "train-two-stage"
    assert run.data.metrics == on_model  # the registry's compare view lines versions up by their source runs
    # Every number stays in the source run's artifacts
    for name in ("validation.json", "vqa-rad.json"):
        logged = mlflow.artifacts.load_dict(f"runs:/{two.run_id}/evaluation/{name}")
        assert logged == json.loads((project / "metrics/two-stage" / name).read_text())
    # A description in Markdown: the selection score first (the list of versions shows that line), then each suite
    first = two.description.split("\n\n")[0]
    assert first == f"two-stage, seed {params.seed}: validation closed 0.750 [0.65, 0.85]", two.description
    assert "- **vqa-rad**: closed 0.750 [0.65, 0.85] · em 0.500" in two.description
    assert "- **validation-blank**: image reliance 0.300 [0.20, 0.40] (one-sided p 1e-05)" in two.description
    assert "train-two-stage" in two.description and "captions (stage 1)" in two.description

    decision = promote(params)
    assert decision["outcome"] == PROMOTED and decision["chosen"] == two_version
    assert str(MlflowClient().get_model_version_by_alias(NAME, "champion").version) == two_version
    _assert_reads_at_a_glance(_versions().values())
    two = _versions()[two_version]
    assert two.tags["promotion.rule"] == "no-champion" and two.tags["promotion.status"] == CHAMPION_STATUS
    assert two.description.split("\n\n")[1].startswith("**Promotion**: became champion by rule `no-champion`")

    # Served answers are the evaluated answers: the evaluate stage's model loading and generation on the same adapter.
    from med_idefics.modeling.generation import generate_answers
    from med_idefics.prompts import extract_answer

    dicom = normalize_image(get_testdata_file("CT_small.dcm"))
    questions = ["Is there a lesion?", "Which organ is shown?", "Where is the lesion?"]
    images = [to_png_bytes(dicom)] * 3
    processor, model = evaluation_model(params, project / "outputs/two-stage/adapter")
    records = [{"image": image, "question": q} for image, q in zip(images, questions, strict=True)]
    expected = [extract_answer(raw) for raw in generate_answers(model, processor, records, "", 4, 4)]
    assert any(expected), "the tiny adapter should say something, or this comparison proves nothing"
    frame = pd.DataFrame({"image": images, "question": questions})
    by_alias = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(frame)
    assert by_alias["answer"].tolist() == expected
    by_version = mlflow.pyfunc.load_model(f"models:/{NAME}/{two_version}").predict(
        frame.iloc[:1], {"max_new_tokens": 1}
    )
    assert len(by_version["answer"].iloc[0].split()) <= 1

    # The CLI answers about a PNG and about the DICOM it came from alike.
    (project / "scan.png").write_bytes(to_png_bytes(dicom))
    for image in (str(project / "scan.png"), get_testdata_file("CT_small.dcm")):
        result = CliRunner().invoke(main, ["predict", "--image", image, "--question", questions[1]])
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == expected[1]

    # A registered model carries its config: answered from a directory with no checkout (no params.yaml) at all.
    nowhere = tmp_path_factory.mktemp("no-checkout")
    monkeypatch.chdir(nowhere)
    for model in (f"models:/{NAME}/{two_version}", f"models:/{NAME}@champion"):
        argv = ["predict", "--model", model, "--image", str(project / "scan.png"), "--question", questions[1]]
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == expected[1]
    assert list(nowhere.iterdir()) == []  # and nothing written there (no mlflow.db)
    result = CliRunner().invoke(main, ["predict", "--image", str(project / "scan.png"), "--question", "q"])
    assert result.exit_code != 0 and "--model" in result.output  # nothing names the model to load: say so
    monkeypatch.chdir(project)

    # Registering again adds nothing; a retrained adapter is a new version.
    assert not any(r.created for r in register(params))
    assert len(_versions()) == 2
    assert len(_logged_model(_versions()[two_version]).metrics) == len(on_model)  # the same scores: none logged again
    # The same package evaluated again: its metrics, artifacts and description follow; the promotion's record stays
    write_metrics(project, "two-stage", 0.80)
    (refreshed,) = register(params, ["two-stage"])
    assert not refreshed.created and refreshed.version == two_version
    two = _versions()[two_version]
    assert registry.evidence(MlflowClient(), two).value("validation", "closed_accuracy_strict") == 0.8
    assert MlflowClient().get_run(two.run_id).data.metrics["validation/closed"] == 0.8
    assert mlflow.artifacts.load_dict(f"runs:/{two.run_id}/evaluation/validation.json")["closed_accuracy"] == 0.8
    assert two.description.startswith(f"two-stage, seed {params.seed}: validation closed 0.800 [0.70, 0.90]")
    assert "\n\n**Promotion**: became champion by rule `no-champion`" in two.description
    # A retrained adapter whose metrics file is still the previous training run's evaluation: no evidence attached.
    old_eval = MlflowClient().create_run(setup_tracking(params), tags={"training_run_id": "train-single-stage"})
    write_metrics(project, "single-stage", 0.99, eval_run_id=old_eval.info.run_id)
    make_adapter(project / "outputs/single-stage/adapter", tiny_base_dir, params.lora.target_modules, seed=7)
    write_run_info(project / "outputs/single-stage", {"run_id": "train-single-stage-2"})
    (again,) = register(params, ["single-stage"])
    assert again.created and len(_versions()) == 3
    assert again.metrics == {} and _logged_model(_versions()[again.version]).metrics is None
    assert "not evaluated" in _versions()[again.version].description
    assert promote(params)["champion_after"] == two_version


COMMITTED = {"git_commit": "0123abc", "git_dirty": "false", "dvc_exp_name": "none"}


def _fake_version(
    client: MlflowClient,
    variant: str,
    closed_accuracy: float | None,
    eval_run_id: str | None = None,
    paper=None,
    provenance: dict[str, str] = COMMITTED,
    looks: bool | None = True,
):
    """A version with what `register` gives it (no model behind it: promotion reads only the registry): its tags, and
    on its logged model the metrics of its validation scores — ``closed_accuracy`` the strict one, ``paper`` the
    paper's (default: the same) — with their evaluation run; ``provenance`` where it came from (default: a committed
    tree, no DVC experiment); its validation-blank scores (:func:`blank_scores`; ``looks`` None: none)."""
    params = load_params("params.yaml")
    experiment = setup_tracking(params)
    with mlflow.start_run(run_name=f"fake-{variant}", experiment_id=experiment) as run:
        pass
    model = client.create_logged_model(experiment, name="model", source_run_id=run.info.run_id)
    with contextlib.suppress(mlflow.exceptions.MlflowException):  # already there
        client.create_registered_model(NAME)
    tags = {"variant": variant, **provenance}
    version = client.create_model_version(NAME, f"models:/{model.model_id}", run.info.run_id, tags=tags,
                                          model_id=model.model_id)  # fmt: skip
    if closed_accuracy is not None:
        paper = closed_accuracy if paper is None else paper
        scores = {"closed_accuracy_strict": closed_accuracy, "closed_accuracy": paper}
        metrics = version_metrics({SELECTION_SUITE: scores}, params)
        registry.log_evidence(client, run.info.run_id, model.model_id, metrics, {SELECTION_SUITE: eval_run_id})
        artifact = f"{registry.EVALUATION_ARTIFACTS}/{SELECTION_SUITE}.json"
        MlflowClient().log_dict(run.info.run_id, scores, artifact)  # every number: the source run's artifacts
        if looks is not None:
            blank = f"{registry.EVALUATION_ARTIFACTS}/{SELECTION_SUITE}-blank.json"
            MlflowClient().log_dict(run.info.run_id, blank_scores(closed_accuracy, looks), blank)
    return str(version.version)


def _eval_run(correct: list[bool]) -> str:
    """An evaluation run whose logged predictions get the closed questions right where ``correct`` says."""
    rows = [{"id": f"q{i}", "question": f"is {i} there?", "answer": "yes", "answer_type": "closed",
             "prediction": "yes" if ok else "no", "raw_generation": ""} for i, ok in enumerate(correct)]  # fmt: skip
    with mlflow.start_run(run_name="eval", experiment_id=setup_tracking(load_params("params.yaml"))) as run:
        path = write_predictions(Path(f"predictions-{run.info.run_id}") / f"{SELECTION_SUITE}.jsonl", rows)
        mlflow.log_artifact(str(path), artifact_path="predictions")
    return run.info.run_id


def _status(client: MlflowClient) -> dict[str, str | None]:
    return {str(v.version): v.tags.get("promotion.status") for v in client.search_model_versions(f"name = '{NAME}'")}


def test_promotion_needs_evidence_beats_the_champion_and_is_idempotent(project):
    params, client = load_params("params.yaml", ["registry.require_significance=false"]), MlflowClient()
    unevaluated = _fake_version(client, "two-stage", None)
    assert promote(params)["outcome"] == NO_CANDIDATE
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(NAME, "champion")  # never on a version without evaluation metrics

    first = _fake_version(client, "single-stage", 0.60)
    assert promote(params)["chosen"] == first
    second = promote(params)
    assert second["outcome"] == KEPT and second["champion_after"] == first

    better = _fake_version(client, "two-stage-n300", 0.70)
    worse = _fake_version(client, "two-stage", 0.55)
    decision = promote(params)
    assert decision["outcome"] == PROMOTED and decision["champion_before"] == first and decision["chosen"] == better
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == better
    status = _status(client)
    assert status[better] == CHAMPION_STATUS and status[first] == f"replaced by version {better}"
    assert status[unevaluated] is None
    tags, description = client.get_model_version(NAME, better).tags, client.get_model_version(NAME, better).description
    assert tags["promotion.outcome"] == PROMOTED and f"beats champion version {first} (0.6000)" in description
    assert "(two-stage-n300) closed_accuracy_strict 0.7000" in description
    listing = f"version {better} (two-stage-n300) 0.7000, version {first} (single-stage) 0.6000, version {worse}"
    assert f"Candidates on validation closed_accuracy_strict: {listing} (two-stage) 0.5500." in description
    assert f"was champion until promote run `{decision['run_id']}`" in client.get_model_version(NAME, first).description
    _assert_reads_at_a_glance(client.search_model_versions(f"name = '{NAME}'"))
    logged = mlflow.artifacts.load_dict(f"runs:/{decision['run_id']}/promotion.json")
    assert logged["chosen"] == better
    assert sorted(c["version"] for c in logged["candidates"]) == sorted({first, better, worse})  # not `unevaluated`


def test_the_gate_never_promotes_a_version_that_answers_without_looking(project):
    """A candidate whose validation closed accuracy does not drop with blank images (or was never scored so) is
    registered but not promoted, whatever it scores; its page says why with both accuracies and p, on every
    promotion; a version that looks is chosen among the rest."""
    params, client = load_params("params.yaml"), MlflowClient()
    blind = _fake_version(client, "blind", 0.90, looks=False)
    unscored = _fake_version(client, "two-stage-n100", 0.85, looks=None)
    sighted = _fake_version(client, "single-stage", 0.60)
    decision = promote(params)
    assert decision["outcome"] == PROMOTED and decision["rule"] == "no-champion" and decision["chosen"] == sighted
    assert {c["version"] for c in decision["refused"]} == {blind, unscored}
    status = _status(client)
    assert status[blind] == status[unscored] == "refused" and status[sighted] == CHAMPION_STATUS
    tags, description = client.get_model_version(NAME, blind).tags, client.get_model_version(NAME, blind).description
    assert (tags["promotion.rule"], tags["promotion.outcome"], tags["promotion.p_value"]) == (
        "answers-without-looking",
        "refused",
        "1",
    )
    assert ("not promoted by rule `answers-without-looking`" in description and "0.900 with its images and 0.900 "
            "with blank ones (image reliance +0.000 [-0.10, +0.10], one-sided McNemar p=1" in description)  # fmt: skip
    assert "not shown to look at the image; a drop of at least 0.05 with p < 0.05 is needed" in description
    assert "never scored on validation with blank images" in client.get_model_version(NAME, unscored).description
    _assert_reads_at_a_glance(client.search_model_versions(f"name = '{NAME}'"))

    # Only a blind challenger beats the champion: it stays, by the gate's rule, and the decision says both accuracies
    decision = promote(params)
    assert decision["outcome"] == KEPT and decision["rule"] == "answers-without-looking"
    assert decision["chosen"] == blind and decision["champion_after"] == sighted
    assert "0.900 with its images and 0.900 with blank ones" in decision["reason"]
    assert "a drop of at least 0.05 with p < 0.05 is needed" in decision["reason"]
    assert client.get_model_version(NAME, blind).tags["promotion.status"] == "refused"
    # An uncommitted version scoring higher still than the blind one: the rule is the one that scored best's
    stray = _fake_version(client, "two-stage-n500", 0.95, provenance=COMMITTED | {"git_dirty": "true"})
    decision = promote(params)
    assert (decision["rule"], decision["chosen"], decision["champion_after"]) == ("uncommitted", stray, sighted)
    assert [c["version"] for c in decision["left_out"]] == [stray]
    client.delete_model_version(NAME, stray)
    # registered again with blank scores that drop: the same version passes, leaves "refused" and may challenge
    source = client.get_model_version(NAME, blind).run_id
    client.log_dict(source, blank_scores(0.90), f"{registry.EVALUATION_ARTIFACTS}/validation-blank.json")
    decision = promote(load_params("params.yaml", ["registry.require_significance=false"]))
    assert decision["outcome"] == PROMOTED and decision["chosen"] == blind and _status(client)[blind] == "champion"
    assert {c["version"] for c in decision["refused"]} == {unscored}


@pytest.mark.parametrize(("reliance", "p", "looks"), [(0.30, 0.001, True), (0.04, 0.001, False), (0.30, 0.06, False),
                                                      (-0.30, 0.001, False), (0.05, 0.049, True)])  # fmt: skip
def test_the_gate_needs_a_significant_drop_of_at_least_min_image_reliance(reliance, p, looks):
    from med_idefics.scoring.reliance import gate

    scores = {"closed_with_image": 0.8, "closed_accuracy_strict": 0.8 - reliance, "image_reliance": reliance,
              "image_reliance_p": p, "n_closed": 55}  # fmt: skip
    verdict = gate(scores, 0.05, "validation")
    assert verdict["looks"] is looks
    assert f"{0.8:.3f} with its images and {0.8 - reliance:.3f} with blank ones" in verdict["reason"]
    assert f"one-sided McNemar p={p:.4g}" in verdict["reason"] and "n = 55 closed questions" in verdict["reason"]
    assert ("it looks at the image" if looks else "not shown to look at the image") in verdict["reason"]
    with pytest.raises(ConfigError, match="min_image_reliance"):
        load_params(Path(__file__).resolve().parents[1] / "params.yaml", ["registry.min_image_reliance=1.5"])


def test_promotion_chooses_on_the_validation_split_never_on_test(trained):
    params = load_params("params.yaml")
    assert params.registry.suite == SELECTION_SUITE and params.data.vqa.validation_fraction > 0
    write_metrics(trained, "single-stage", 0.80, test=0.60)  # better on validation
    write_metrics(trained, "two-stage", 0.70, test=0.95)  # much better on test: must not matter
    registered = {r.variant: r.version for r in register(params)}
    decision = promote(params)
    assert decision["suite"] == "validation" and decision["chosen"] == registered["single-stage"]
    assert str(MlflowClient().get_model_version_by_alias(NAME, "champion").version) == registered["single-stage"]


def test_promotion_on_validation_needs_a_validation_split_and_a_dry_run_moves_nothing(project):
    params, client = load_params("params.yaml"), MlflowClient()
    without = load_params("params.yaml", ["data.vqa.validation_fraction=0"])
    with pytest.raises(ConfigError, match="validation_fraction"):
        promote(without)
    first = _fake_version(client, "single-stage", 0.60)
    dry = promote(params, dry_run=True)
    assert dry["dry_run"] and dry["outcome"] == PROMOTED and dry["chosen"] == first and dry["champion_after"] is None
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(NAME, "champion")  # nothing moved
    assert "promotion.outcome" not in client.get_model_version(NAME, first).tags
    result = CliRunner().invoke(main, ["promote", "--dry-run"])
    assert result.exit_code == 0 and result.stdout.startswith("dry run, nothing moved: promoted"), result.output


def test_promotion_ranks_on_strict_closed_accuracy_not_the_papers_substring_test(project):
    params, client = load_params("params.yaml", ["registry.require_significance=false"]), MlflowClient()
    assert params.registry.metric == "closed_accuracy_strict"
    honest = _fake_version(client, "single-stage", 0.70)
    yes_no_to_everything = _fake_version(client, "two-stage", 0.0, paper=1.0)  # "yes no": perfect for the paper
    # under the paper's rule, read from the full scores (its logged model carries the headline metrics only)
    papers = load_params("params.yaml", ["registry.require_significance=false", "registry.metric=closed_accuracy"])
    assert promote(papers, dry_run=True)["chosen"] == yes_no_to_everything
    decision = promote(params)
    assert decision["chosen"] == honest and yes_no_to_everything != honest


def test_by_default_the_champion_moves_only_on_a_significant_paired_test(project):
    params = load_params("params.yaml")
    assert params.registry.require_significance and not params.registry.allow_uncommitted  # the shipped defaults
    client = MlflowClient()
    champion = _fake_version(client, "single-stage", 0.50, _eval_run([True] * 20 + [False] * 20))
    first = promote(params)
    assert first["outcome"] == PROMOTED and first["rule"] == "no-champion"
    # 2 more right answers out of 40: better, but McNemar p = 0.5
    slightly = _fake_version(client, "two-stage", 0.55, _eval_run([True] * 22 + [False] * 18))
    decision = promote(params)
    assert decision["outcome"] == KEPT and decision["rule"] == "not-significant" and decision["chosen"] == slightly
    assert decision["p_value"] == pytest.approx(0.5) and not decision["test"]["significant"]
    # the decision records both sides: score, commit, dirty state, DVC experiment
    assert decision["challenger"]["version"] == slightly and decision["challenger"]["value"] == 0.55
    assert decision["champion"]["version"] == champion and decision["champion"]["value"] == 0.50
    for side in ("challenger", "champion"):
        assert {k: decision[side][k] for k in COMMITTED} == COMMITTED
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == champion
    tags = client.get_model_version(NAME, slightly).tags
    assert tags["promotion.status"] == "challenger" and tags["promotion.rule"] == "not-significant"
    assert tags["promotion.p_value"] == "0.5" and tags["promotion.run_id"] == decision["run_id"]
    in_words = registry.promotion_paragraph(client.get_model_version(NAME, slightly).description)
    assert in_words.startswith("**Promotion**: not promoted by rule `not-significant`"), in_words
    assert f"beats champion version {champion} (0.5000)" in in_words and "p=0.5" in in_words, in_words
    kept = client.get_model_version(NAME, champion)  # still champion: how it became one is its record
    assert kept.tags["promotion.rule"] == "no-champion" and "became champion" in kept.description
    result = CliRunner().invoke(main, ["promote", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("dry run, nothing moved: kept by rule not-significant:"), result.output
    assert "p=0.5" in result.stdout and "commit 0123abc" in result.stdout, result.output
    # 18 more right answers: p < 0.05
    clearly = _fake_version(client, "two-stage-n300", 0.95, _eval_run([True] * 38 + [False] * 2))
    decision = promote(params)
    assert decision["outcome"] == PROMOTED and decision["rule"] == "significant" and decision["chosen"] == clearly
    assert (
        decision["p_value"] < 0.05 and float(client.get_model_version(NAME, clearly).tags["promotion.p_value"]) < 0.05
    )
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == clearly


@pytest.mark.parametrize(
    "provenance",
    [{**COMMITTED, "dvc_exp_name": "queued-lr", "git_dirty": "true"}, {**COMMITTED, "git_dirty": "true"},
     {**COMMITTED, "git_commit": "none"}],
    ids=["dvc-experiment", "dirty-tree", "outside-git"],
)  # fmt: skip
def test_a_version_from_uncommitted_work_is_registered_but_not_promoted_unless_asked(project, provenance):
    params, client = load_params("params.yaml"), MlflowClient()
    champion = _fake_version(client, "single-stage", 0.50, _eval_run([True] * 20 + [False] * 20))
    promote(params)
    stray = _fake_version(client, "two-stage", 0.95, _eval_run([True] * 38 + [False] * 2), provenance=provenance)
    decision = promote(params)
    assert decision["outcome"] == KEPT and decision["rule"] == "uncommitted" and decision["chosen"] == stray
    assert [c["version"] for c in decision["left_out"]] == [stray]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == champion
    assert "--allow-uncommitted" in registry.promotion_paragraph(client.get_model_version(NAME, stray).description)
    result = CliRunner().invoke(main, ["promote", "--dry-run"])
    assert result.stdout.startswith("dry run, nothing moved: kept by rule uncommitted:"), result.output
    result = CliRunner().invoke(main, ["promote", "--allow-uncommitted"])  # asked: the evidence decides
    assert result.exit_code == 0 and "promoted by rule significant" in result.stdout, result.output
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == stray


def test_register_records_where_a_version_came_from(trained, monkeypatch):
    """Commit, dirty state and DVC experiment on each version: the pipeline's own outputs (dvc.lock, DVC outs) do not
    make a tree dirty, an edited params.yaml does; DVC_EXP_NAME names the experiment."""
    project = trained
    write_metrics(project, "two-stage", 0.7)
    names = ("validation.json", "validation-blank.json", "vqa-rad.json", "run_info.json")
    outs = [f"metrics/two-stage/{name}" for name in names]
    lock = {"schema": "2.0", "stages": {"evaluate@two-stage": {"outs": [{"path": path} for path in outs]}}}
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    _git(project, "add", "dvc.lock", "metrics")
    _git(project, "commit", "-qm", "results")
    write_metrics(project, "two-stage", 0.75)  # a rerun changed a tracked output: still a committed state
    (project / "dvc.lock").write_text((project / "dvc.lock").read_text() + "\n")
    params = load_params("params.yaml")
    params_yaml = project / "params.yaml"
    params_yaml.write_text(params_yaml.read_text() + "# edited\n")
    monkeypatch.setenv("DVC_EXP_NAME", "queued-lr")
    (stray,) = register(params, ["two-stage"])
    tags = _versions()[stray.version].tags
    assert tags["git_dirty"] == "true" and tags["dvc_exp_name"] == "queued-lr"

    _git(project, "checkout", "params.yaml")  # the experiment applied and committed: the same package, registered again
    monkeypatch.delenv("DVC_EXP_NAME")
    (clean,) = register(params, ["two-stage"])
    head = _git(project, "rev-parse", "HEAD").strip()
    assert clean.version == stray.version and not clean.created
    expected = {"git_commit": head, "git_dirty": "false", "dvc_exp_name": "none"}
    assert {k: _versions()[clean.version].tags[k] for k in COMMITTED} == expected

    params_yaml.write_text(params_yaml.read_text() + "# edited again\n")
    monkeypatch.setenv("DVC_EXP_NAME", "queued-lr-2")  # a later experiment reproducing it: still the committed one
    register(params, ["two-stage"])
    assert {k: _versions()[clean.version].tags[k] for k in COMMITTED} == expected


def test_a_version_registered_before_keeps_its_evidence_until_registered_again(trained):
    """Versions registered before the scores moved to logged models carry them as tags (a team's store has them, a
    champion among them): promotion still reads them there, and registering the same package again moves them."""
    params, client = load_params("params.yaml"), MlflowClient()
    old_eval = _eval_run([True] * 20 + [False] * 20)
    # what the previous registry stage wrote: every number and evaluation run as a tag; no metric on the logged model
    before = {"validation.closed_accuracy_strict": "0.5", "validation.closed_accuracy_strict_ci_low": "0.4",
              "validation.closed_accuracy_strict_ci_high": "0.6", "validation.n": "40", "vqa-rad.exact_match": "0.5",
              "validation.eval_run_id": old_eval, "adapter_sha256": "abc", "promotion.reason": "no champion yet",
              "promotion.candidates": "v1 two-stage 0.5000"}  # fmt: skip
    champion = _fake_version(client, "two-stage", None)
    for key, value in before.items():
        client.set_model_version_tag(NAME, champion, key, value)
    client.set_registered_model_alias(NAME, "champion", champion)
    evidence = registry.evidence(client, client.get_model_version(NAME, champion))
    assert evidence.value("validation", "closed_accuracy_strict", "_ci_high") == 0.6
    assert evidence.eval_runs == {"validation": old_eval}
    slightly = _fake_version(client, "single-stage", 0.55, _eval_run([True] * 22 + [False] * 18))
    decision = promote(params)  # the champion has evidence and an evaluation run to pair: no free pass
    assert decision["rule"] == "not-significant" and decision["champion"]["value"] == 0.5, decision["reason"]
    assert decision["champion"]["eval_run_id"] == old_eval and decision["chosen"] == slightly

    write_metrics(trained, "two-stage", 0.70)
    (registered,) = register(params, ["two-stage"])
    for key, value in before.items():
        client.set_model_version_tag(NAME, registered.version, key, value)
    (again,) = register(params, ["two-stage"])
    assert again.version == registered.version and not again.created
    moved = client.get_model_version(NAME, registered.version)
    assert not set(before) & set(moved.tags), sorted(moved.tags)
    assert registry.evidence(client, moved).value("validation", "closed_accuracy_strict") == 0.7
    _assert_reads_at_a_glance([moved])


def test_concurrent_promotions_leave_one_consistent_champion(project):
    """Two promotions at once, under the default rules: the alias ends on the version they choose, the significantly
    better one; an uncommitted version scoring higher still is left out by both."""
    params, client = load_params("params.yaml"), MlflowClient()
    right = {0.61: 24, 0.74: 38, 0.70: 27, 0.52: 21}  # of 40 questions, each set a prefix of the next: paired
    versions = [_fake_version(client, "two-stage-n0", 0.61, _eval_run([True] * 24 + [False] * 16))]
    assert promote(params)["champion_after"] == versions[0]  # a champion to replace
    for i, value in enumerate((0.74, 0.70, 0.52), start=1):
        correct = [True] * right[value] + [False] * (40 - right[value])
        versions.append(_fake_version(client, f"two-stage-n{i}", value, _eval_run(correct)))
    best = versions[1]
    stray = {**COMMITTED, "dvc_exp_name": "queued-lr"}
    _fake_version(client, "two-stage-n9", 0.99, _eval_run([True] * 40), provenance=stray)
    barrier, errors, decisions = threading.Barrier(2), [], []

    def run():
        try:
            barrier.wait()
            decisions.append(promote(params))
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(decisions) == 2
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == best
    status = _status(client)
    assert [v for v, s in status.items() if s == CHAMPION_STATUS] == [best]
    assert all(d["champion_after"] == best for d in decisions)


def test_hub_token_never_reaches_the_tracking_store(trained, isolated_tracking_store, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    write_metrics(trained, "two-stage", 0.7)
    runner = CliRunner()
    result = runner.invoke(main, ["register", "--variant", "two-stage", "--records-dir", "registered"])
    assert result.exit_code == 0, result.output
    record = json.loads((trained / "registered/two-stage.json").read_text())
    assert record["model_name"] == NAME and record["metrics"]["vqa-rad/closed"] == 0.7
    result = runner.invoke(main, ["promote", "--out", "promotion.json"])
    assert result.exit_code == 0, result.output
    assert json.loads((trained / "promotion.json").read_text())["champion_after"] == record["version"]
    files = [p for p in Path(isolated_tracking_store).rglob("*") if p.is_file()]
    assert any(p.name == "MLmodel" for p in files)  # the artifacts are under the store
    leaked = [str(p) for p in files if FAKE_TOKEN.encode() in p.read_bytes()]
    assert not leaked
