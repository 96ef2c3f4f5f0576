"""`make demo-check` reads the MLflow store the pipeline logged to — `$MLFLOW_TRACKING_URI` (a team server) as much as
the default sqlite file — never a hard-coded `mlflow.db`: the demo's MLflow checks, run on a store of our making."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from med_idefics.tracking.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

CHECK = "test_the_experiment_opens_as_model_training"


def _demo_check(repo_root: Path, uri: str) -> subprocess.CompletedProcess:
    """The one demo check that needs only the experiment, run as `make demo-check` runs it, with ``uri`` exported."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "demo",
               "tests/test_demo_mlflow.py", "-k", CHECK]  # fmt: skip
    env = os.environ | {"MLFLOW_TRACKING_URI": uri}
    return subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)


def test_the_demo_checks_read_the_configured_store(repo_root, tmp_path):
    """A store whose experiment is of the wrong kind: the check fails on it, so it read this store (not the repo's
    mlflow.db, which may not exist: the check used to fail on that alone). One subprocess: the check costs ~20 s."""
    uri = f"sqlite:///{tmp_path / 'team.db'}"
    MlflowClient(uri).create_experiment("med-idefics", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    done = _demo_check(repo_root, uri)
    assert done.returncode == 1 and "1 failed" in done.stdout, done.stdout[-3000:]
    assert f"assert 'genai_development' == '{EXPERIMENT_KIND}'" in done.stdout, done.stdout[-3000:]
