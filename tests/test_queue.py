"""Queued DVC experiments, for real (`dvc exp run --queue`, `dvc queue start` in a tmp repository): a run reaches the
store pinned in the experiment's params — a relative sqlite URI meaning the repository's mlflow.db, not the temporary
copy's — and an experiment whose store was not pinned refuses to start and says why, logging nowhere."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

BIN = Path(sys.executable).parent
DVC_YAML = """stages:
  promote:  # the cheapest tracked stage: an empty registry, so a `promote` run deciding no-candidate
    cmd: med-idefics promote --out promotion.json
    params: [registry]
    outs:
      - promotion.json:
          cache: false
"""

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _dvc(repo: Path, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"dvc {' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture
def repo(tmp_path, repo_root) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    for command in (["git", "init", "-q"], ["git", "config", "user.email", "t@t"], ["git", "config", "user.name", "t"]):
        subprocess.run(command, cwd=repo, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=repo, check=True)
    shutil.copy(repo_root / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=repo, check=True)
    return repo


def test_a_queued_experiment_logs_to_the_store_pinned_when_queued_or_refuses(repo):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    server = "http://127.0.0.1:9"  # nothing listens there: a run that went to it would fail
    _dvc(repo, "exp", "run", "--queue", "-n", "pinned", "-S", "mlflow.tracking_uri=sqlite:///mlflow.db", env=env)
    _dvc(repo, "exp", "run", "--queue", "-n", "unpinned", env=env | {"MLFLOW_TRACKING_URI": server})
    _dvc(repo, "queue", "start", env=env)  # started without the URI the second one was queued with
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            status = _dvc(repo, "queue", "status", env=env)
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(1)
    finally:
        _dvc(repo, "queue", "stop", env=env)
    lines = dict(re.findall(r"^[0-9a-f]{7}\s+(\S+)\s.*\s(\w+)$", status, re.MULTILINE))  # name → status
    assert lines == {"pinned": "Success", "unpinned": "Failed"}, status

    log = _dvc(repo, "queue", "logs", "unpinned", env=env)
    assert "temporary copy" in log and "dvc queue start" in log, log[-2000:]
    assert "-S mlflow.tracking_uri=sqlite:///mlflow.db" in log  # what the worker's environment would have given

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")  # the repository's store, not the copy's
    experiment = client.get_experiment_by_name("med-idefics")
    assert experiment is not None, "the pinned experiment's run did not reach the repository's mlflow.db"
    runs = client.search_runs([experiment.experiment_id])
    assert [(r.info.run_name, r.info.status, r.data.tags.get("dvc_exp_name")) for r in runs] == [
        ("promote", "FINISHED", "pinned")
    ]
    assert Path(experiment.artifact_location.removeprefix("file://")) == repo / "mlartifacts"
