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

BIN = Path(sys.executable).parent


def _runs(name: str):
    experiment = mlflow.get_experiment_by_name("med-idefics")
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list") if experiment else []
    return [r for r in runs if r.info.run_name == name]


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


def test_mlflow_run_stage2_entry_point(project, repo_root):
    from med_idefics.config import load_params
    from med_idefics.train import TrainRequest, train

    train(load_params("params.yaml"), TrainRequest(stage="stage1", out_dir=Path("outputs/stage1")))
    for name in ("MLproject", "conda.yaml"):
        shutil.copy(repo_root / name, project / name)

    command = [str(BIN / "mlflow"), "run", str(project), "-e", "stage2", "--env-manager", "local",
               "--experiment-name", "med-idefics", "-P", "lr=0.004"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env_with_venv())
    assert result.returncode == 0, result.stderr[-4000:]

    (run,) = [r for r in _all_runs() if r.data.tags.get("variant") == "two-stage"]
    assert run.info.status == "FINISHED"
    assert run.data.params["stage2.lr"] == "0.004"  # the entry point's parameter overrode params.yaml …
    assert run.data.params["stage2.epochs"] == "2.0"  # … and only that: empty parameters take params.yaml
    assert (project / "outputs/mlproject/two-stage/adapter/adapter_model.safetensors").is_file()
    assert not (project / "outputs/two-stage").exists()  # never the DVC-tracked outputs


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
    from med_idefics.results import read_run_info

    metrics = json.loads((project / "outputs/mlproject/metrics/base/med-halt.json").read_text())
    assert metrics["n"] == 1 and read_run_info(project / "outputs/mlproject/metrics/base")["variant"] == "base"
