"""What `make paper-smoke` must leave in outputs/paper-smoke/: the paper profile's pipeline complete and up to date,
every stage recorded, every run finished, promotion decided by its rules — the image gate refusing what does not look
at the image — and the pipeline built so that a GPU user loses no work to it.
Marked `paper_smoke`: `.ci/paper_smoke.py` runs these checks inside the copy, after `dvc repro`; `make test`
deselects them (a fresh clone has no smoke outputs). A missing output fails, naming what makes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from med_idefics.config import Params, apply_overrides, build, load_params
from med_idefics.data.suites import SUITES, VALIDATION, VALIDATION_BLANK
from med_idefics.tracking.registry import evidence
from med_idefics.tracking.runs import seeded_run_name

pytestmark = pytest.mark.paper_smoke
ROOT = Path(__file__).resolve().parents[1]  # the copy, outputs/paper-smoke/


@pytest.fixture(scope="module")
def params() -> Params:
    return load_params(ROOT / "params.yaml")


@pytest.fixture(scope="module")
def client() -> MlflowClient:
    db = ROOT / "mlflow.db"
    assert db.is_file(), f"{db} missing: run `make paper-smoke`"
    return MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")


def sweep_sizes(params: Params) -> list[int]:
    return params.sweep.sizes


def test_the_params_are_the_paper_profiles_with_qlora(params):
    assert params.profile == "paper" and params.quantization.load_in_4bit is True
    assert params.quantization.quant_type == "nf4" and params.model.base == "tiny-real-processor"
    assert (params.data.captions.dataset, params.data.vqa.dataset) == ("roco", "vqa-rad")
    assert (params.data.ood.dataset, params.data.nonsense.dataset) == ("path-vqa", "med-halt")


def test_every_stage_is_recorded_and_up_to_date(monkeypatch):
    from dvc.repo import Repo

    monkeypatch.chdir(ROOT)
    with Repo(str(ROOT)) as repo:
        stages = {stage.addressing for stage in repo.index.stages if not stage.is_data_source}
        assert repo.status() == {}
    locked = set(yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"])
    assert stages <= locked, f"not in dvc.lock: {sorted(stages - locked)}"


def test_the_base_folder_holds_no_run_record(params):
    """A run id inside the base folder (a DVC output) would change its hash on every rerun of the cheap base stage."""
    base = ROOT / params.model.base_dir
    assert base.is_dir(), f"{base} missing: run `make paper-smoke`"
    assert not (base / "run_info.json").exists()


def test_every_run_finished_and_promotion_decided_by_its_rules(client, params):
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    assert experiment is not None, "no experiment: run `make paper-smoke`"
    runs = client.search_runs([experiment.experiment_id], max_results=5000)
    finished = {run.info.run_name for run in runs if run.info.status == "FINISHED"}
    unfinished = sorted({f"{r.info.run_name} {r.info.status}" for r in runs if r.info.status != "FINISHED"})
    assert not unfinished, unfinished
    sweep = [f"two-stage-n{n}" for n in sweep_sizes(params)]
    trained = ["base", "stage1", "two-stage", "single-stage", *(f"stage1-n{n}" for n in sweep_sizes(params)), *sweep]
    expected = {seeded_run_name(name, params.seed) for name in trained} | {"report", "promote"}
    all_suites = (*SUITES, VALIDATION, VALIDATION_BLANK)
    expected |= {f"eval-{v}-{s}" for v in ("base", "single-stage", "two-stage") for s in all_suites}
    expected |= {f"eval-{v}-{s}" for v in sweep for s in ("vqa-rad", "blank", VALIDATION, VALIDATION_BLANK)}
    expected |= {f"register-{v}" for v in ("single-stage", "two-stage", *sweep)}
    assert not expected - finished, sorted(expected - finished)
    # Random tiny layers hardly look at the image: the image gate decides. Every version was scored with blank images;
    # one that looks may become champion, and when none does, every one is refused and no alias is set.
    decision = json.loads((ROOT / "outputs" / "registry" / "promotion.json").read_text())
    candidates = decision["candidates"]
    assert len(candidates) == 2 + len(sweep) and all(c["gate"]["p_value"] is not None for c in candidates)
    looking = {c["version"] for c in candidates if c["gate"]["looks"]}
    assert {c["version"] for c in decision["refused"]} == {c["version"] for c in candidates} - looking
    name, alias = params.registry.model_name, params.registry.alias
    for version in {c["version"] for c in decision["refused"]}:
        assert client.get_model_version(name, version).tags["promotion.rule"] == "answers-without-looking"
    if not looking:
        assert decision["rule"] == "answers-without-looking" and decision["champion_after"] is None, decision
        with pytest.raises(MlflowException):
            client.get_model_version_by_alias(name, alias)
        return
    champion = client.get_model_version_by_alias(name, alias)
    assert str(champion.version) in looking
    assert evidence(client, champion).value(params.registry.suite, params.registry.metric) is not None
    assert len(champion.tags) <= 15, sorted(champion.tags)  # its scores are on its logged model, not in tags


def test_no_sweep_point_repeats_two_stage(params):
    """A sweep point trains stage 1 on fewer captions than two-stage; the full size would be two-stage again."""
    full = json.loads((ROOT / "outputs" / "stage1" / "train_summary.json").read_text())["n_train"]
    assert sweep_sizes(params), "the smoke's sweep has no points"
    for n in sweep_sizes(params):
        point = json.loads((ROOT / "outputs" / f"stage1-n{n}" / "train_summary.json").read_text())["n_train"]
        assert point < full, f"sweep point {n}: stage 1 on {point} captions, as many as two-stage's {full}"


def _pipeline(tmp_path: Path, overrides: dict) -> dict[str, dict]:
    """The smoke's dvc.yaml resolved with ``overrides`` on its params: stage → {deps, outs, params}."""
    from dvc.repo import Repo

    data = apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    build(Params, data)  # the overridden params are valid
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    Repo.init(str(tmp_path), no_scm=True)
    with Repo(str(tmp_path)) as repo:
        graph = repo.index.graph
        stages = {s.name: s for s in repo.index.stages}
        return {
            name: {
                "outs": [str(out.def_path) for out in stage.outs],
                "params": [key for dep in stage.deps if hasattr(dep, "params") for key in dep.params],
                "upstream": {a.name for a in _ancestors(graph, stage)},
            }
            for name, stage in stages.items()
        }


def _ancestors(graph, stage) -> set:
    import networkx as nx

    return set(nx.descendants(graph, stage))


def test_a_stage2_or_eval_change_reruns_no_stage1_training(tmp_path):
    """The stage-1 trainings (up to ~11 GPU-hours each) are stages of their own: no stage that reads the stage-2 or
    evaluation params writes a stage-1 adapter, so such a change (or a crash in stage 2) never repeats stage 1."""
    for name, stage in _pipeline(tmp_path, {}).items():
        if any(key.split(".")[0] in ("stage2", "eval") for key in stage["params"]):
            assert not [out for out in stage["outs"] if out.startswith("outputs/stage1")], (name, stage["outs"])


def test_the_sweep_can_be_left_out_entirely(tmp_path):
    """With the sweep switched off, no sweep stage exists and report, register and promote need none."""
    stages = _pipeline(tmp_path, {"sweep.sizes": []})
    assert not [name for name in stages if "sweep" in name], sorted(stages)
    for name in ("report", "register", "promote"):
        assert not [up for up in stages[name]["upstream"] if "sweep" in up], (name, stages[name]["upstream"])


def test_registered_versions_carry_a_signature_and_no_input_example(client, params, monkeypatch):
    """MLflow loads and runs a model logged with an input example (an 8B load per version, none freed): register
    gives the signature only."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{ROOT / 'mlflow.db'}")
    records = sorted((ROOT / "outputs" / "registry" / "versions").glob("*.json"))  # what the register stage wrote
    assert records, "no registered version: run `make paper-smoke`"
    for record in records:
        version = json.loads(record.read_text())["version"]
        info = mlflow.models.get_model_info(f"models:/{params.registry.model_name}/{version}")
        assert info.signature is not None, version
        assert info.saved_input_example_info is None, f"version {version} was logged with an input example"
