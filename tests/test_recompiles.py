"""Compiled training with the vision cache does not recompile step after step (issue 24): after the first step, each
compiled function recompiles at most twice in 20 steps (once per dimension that turns out to vary: sequence length,
patch grid), on the project's transformers and on 5.17, the lent GPU machine's. Each runs tests/compile_check.py in a
fresh process (dynamo's state is per process); 5.17 from a folder put first on PYTHONPATH, installed there once from
PyPI (``.venv/transformers-5.17``, ignored)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu_prep
REPO_ROOT = Path(__file__).resolve().parents[1]
# transformers 5.17 wants huggingface-hub < 2 (the project pins 2.x), which wants httpx
LENT_MACHINE = ("transformers==5.17.0", "huggingface-hub==1.33.0", "httpx==0.28.1", "httpcore==1.0.9")
MOST = 2


def run_check(pythonpath: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "compile_check.py"), "--steps", "20"],
                          capture_output=True, text=True, env=env, timeout=900, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def transformers_517() -> str:
    folder = Path(sys.prefix) / "transformers-5.17"
    if not (folder / "transformers" / "__init__.py").is_file():
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder),
                               *LENT_MACHINE], capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"transformers 5.17 could not be installed from PyPI: {done.stderr.strip()[-500:]}")
    return str(folder)


def check(result: dict, version: str) -> None:
    assert result["transformers"] == version and result["steps"] == 20
    worst = {where: found for where, found in result["recompiles_after_first_step"].items() if len(found) > MOST}
    assert not worst, json.dumps(worst, indent=1)
    assert result["recompiles_after_first_step"], "no recompile at all: the check saw no varying batch"


def test_the_projects_transformers_recompiles_at_most_twice():
    from importlib.metadata import version

    check(run_check(), version("transformers"))


def test_transformers_517_recompiles_at_most_twice(transformers_517):
    check(run_check(transformers_517), "5.17.0")
