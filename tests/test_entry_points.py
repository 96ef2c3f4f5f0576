"""Training through the other front doors: several processes with `torchrun` (DDP, gloo on CPU — `accelerate launch`
without a multi-CPU config starts one process only) and the
MLflow project's entry points (`mlflow run . -e stage2 --env-manager local`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import torch
import yaml
from safetensors.torch import load_file

from med_idefics.reporting.results import eval_run_id

BIN = Path(sys.executable).parent


def _runs(name: str):
    experiment = mlflow.get_experiment_by_name("med-idefics")
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list") if experiment else []
    return [r for r in runs if r.info.run_name.split(" (seed ")[0] == name]  # "two-stage (seed 42)", "eval-…"


def test_two_process_ddp_training_logs_once_and_saves_a_loadable_adapter(project):
    from peft import PeftModel

    from med_idefics.config import load_params
    from med_idefics.modeling.loading import load_base_model

    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "med_idefics.cli",
               "train", "single-stage", "--out", "outputs/ddp"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    (run,) = _runs("single-stage")  # rank 1 logged nothing
    assert run.info.status == "FINISHED"
    summary = json.loads((project / "outputs/ddp/train_summary.json").read_text())
    assert summary["optimizer_steps"] == 6  # 24 records / (2 processes × micro-batch 4) × 2 epochs: data parallel

    params = load_params("params.yaml")
    adapter = project / "outputs/ddp/adapter"
    model = PeftModel.from_pretrained(load_base_model(params.model.base_dir, params.quantization), str(adapter))
    saved = load_file(adapter / "adapter_model.safetensors")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(saved) == len(loaded) > 0
    for key, value in saved.items():
        match = [v for k, v in loaded.items() if k.replace(".default", "") == key]
        assert match and torch.equal(match[0], value), key


def test_mlflow_run_chains_stage1_stage2_evaluate_through_its_own_outputs(project, repo_root):
    """`mlflow run . -e stage1`, then `-e stage2`, then `-e evaluate`, each with its defaults: stage 2 continues the
    entry point's stage 1 and evaluate scores that stage 2 — never a DVC-tracked output, read or written."""
    for name in ("MLproject", "conda.yaml"):
        shutil.copy(repo_root / name, project / name)

    def mlflow_run(entry_point: str, *parameters: str) -> None:
        command = [str(BIN / "mlflow"), "run", str(project), "-e", entry_point, "--env-manager", "local",
                   "--experiment-name", "med-idefics"]  # fmt: skip
        for parameter in parameters:
            command += ["-P", parameter]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env_with_venv())
        assert result.returncode == 0, result.stderr[-4000:]

    mlflow_run("stage1")
    mlflow_run("stage2", "lr=0.004")
    mlflow_run("evaluate", "suite=vqa-rad")

    runs = {r.data.tags.get("variant"): r for r in _all_runs()}
    stage1, two_stage = runs["stage1"], runs["two-stage"]
    assert two_stage.info.status == "FINISHED"
    assert two_stage.data.params["stage2.lr"] == "0.004"  # the entry point's parameter overrode params.yaml …
    assert two_stage.data.params["stage2.epochs"] == "2.0"  # … and only that: empty parameters take params.yaml
    assert two_stage.data.tags["init_adapter"] == "outputs/mlproject/stage1/adapter"
    assert two_stage.data.tags["stage1_run_id"] == stage1.info.run_id
    (evaluation,) = [r for r in _all_runs() if r.info.run_name == "eval-two-stage-vqa-rad"]
    assert evaluation.data.tags["training_run_id"] == two_stage.info.run_id
    metrics = json.loads((project / "outputs/mlproject/metrics/two-stage/vqa-rad.json").read_text())
    assert metrics["n"] == 3
    assert eval_run_id(project / "outputs/mlproject/metrics", "two-stage", "vqa-rad") == evaluation.info.run_id
    written = {p.relative_to(project).parts[0:2] for p in project.rglob("*") if p.is_file()}
    assert {parts for parts in written if parts[0] in ("outputs", "metrics", "reports")} == {("outputs", "mlproject")}


def test_no_entry_point_writes_a_dvc_output(repo_root):
    """Every entry point that writes names its outputs, and they all lie under outputs/mlproject/."""
    import shlex

    writing_flags = ("--out", "--predictions-dir", "--metrics-dir", "--records-dir")
    writes_by_default = {"base", "train", "evaluate", "report"}  # commands whose output defaults are DVC outputs
    entry_points = yaml.safe_load((repo_root / "MLproject").read_text())["entry_points"]
    for name, entry in entry_points.items():
        defaults = {
            k: v.get("default", "") if isinstance(v, dict) else "" for k, v in entry.get("parameters", {}).items()
        }
        argv = shlex.split(entry["command"].format(**defaults))
        outputs = {flag: argv[i + 1] for i, flag in enumerate(argv[:-1]) if flag in writing_flags}
        if argv[1] in writes_by_default:
            assert outputs, f"entry point {name}: `{' '.join(argv[:3])}` writes DVC outputs unless told where"
        for flag, path in outputs.items():
            assert path.startswith("outputs/mlproject/"), f"entry point {name}: {flag} {path} is not its own output"


def _all_runs():
    experiment = mlflow.get_experiment_by_name("med-idefics")
    return mlflow.search_runs([experiment.experiment_id], output_format="list")


def _env_with_venv() -> dict[str, str]:
    import os

    return os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def test_mlflow_run_evaluate_entry_point_with_its_empty_default_name(project, repo_root):
    """Parameters left empty must reach the CLI as "not given" (MLflow shell-quotes values itself)."""
    from med_idefics.data.schema import write_splits

    write_splits(project / "data", "syn-vqa", {"nonsense": [
        {"id": "n1", "image": None, "question": "how many wheels does the liver have?", "answer": "i do not know",
         "answer_type": "open", "dataset": "syn-vqa", "split": "nonsense"},
    ]})  # fmt: skip
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["nonsense"] = {"dataset": "syn-vqa", "split": "nonsense"}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name in ("MLproject", "conda.yaml"):
        shutil.copy(repo_root / name, project / name)

    command = [str(BIN / "mlflow"), "run", str(project), "-e", "evaluate", "--env-manager", "local",
               "--experiment-name", "med-idefics", "-P", "variant=base", "-P", "suite=med-halt"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env_with_venv())
    assert result.returncode == 0, result.stderr[-4000:]
    from med_idefics.reporting.results import read_run_info

    metrics = json.loads((project / "outputs/mlproject/metrics/base/med-halt.json").read_text())
    assert metrics["n"] == 1 and read_run_info(project / "outputs/mlproject/metrics/base")["variant"] == "base"


def test_mlflow_run_without_an_experiment_name_logs_into_the_projects_experiment(project, repo_root):
    """`mlflow run . -e promote` as docs/pipeline.md writes it (no --experiment-name): the project run opens in
    `med-idefics` and is the stage's run; from outside the checkout MLflow opens it in Default, and the stage logs
    its run in `med-idefics` all the same, the project run pointing there."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    for name in ("MLproject", "conda.yaml"):
        shutil.copy(repo_root / name, project / name)
    client = MlflowClient()

    def mlflow_run(cwd: Path) -> None:
        command = [str(BIN / "mlflow"), "run", str(project), "-e", "promote", "--env-manager", "local"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env_with_venv(), cwd=cwd)
        assert result.returncode == 0, result.stderr[-4000:]

    mlflow_run(project)
    (run,) = _runs("promote")
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.source.type"] == "PROJECT"
    assert run.data.tags["mlflow.project.entryPoint"] == "promote" and "mlflow_project_run_id" not in run.data.tags
    assert not client.search_runs(["0"], run_view_type=ViewType.ALL)  # nothing in Default

    elsewhere = project.parent / "elsewhere"
    elsewhere.mkdir()
    mlflow_run(elsewhere)
    (second,) = [r for r in _runs("promote") if r.info.run_id != run.info.run_id]
    assert second.info.status == "FINISHED" and second.data.tags["mlflow.project.entryPoint"] == "promote"
    (project_run,) = client.search_runs(["0"], run_view_type=ViewType.ALL)
    assert second.data.tags["mlflow_project_run_id"] == project_run.info.run_id
    assert project_run.info.status == "FINISHED"
    assert project_run.data.tags["moved_to"] == f"med-idefics/{second.info.run_id}"
