"""``make slurm-smoke``: the demo on a real single-node Slurm cluster, in ``outputs/slurm-smoke/``, checked.

A cluster of its own (``tests/slurm_cluster.py``: munged, slurmctld, slurmd from a temporary folder; two stand-in GPUs
so that GPU requests are scheduled for real), and a copy of the working tree as git sees it (a git repository of its
own, as ``make paper-smoke`` makes one: the workspace's own ``make demo`` outputs, store and lock are never touched;
made afresh each time, so every stage runs). The copy opts in to its SQLite store
(``cluster.slurm.sqlite_single_node: true``: one node), then, as a user on a login node:

1. ``med-idefics data demo``, commit, ``med-idefics repro --slurm --wait``: every stage a job; then the demo's science
   checks (``make demo-check``'s tests) pass on what the jobs made and ``dvc status`` is clean;
2. a stage made to fail (``registry.model_name: bad/name``, which MLflow refuses): ``repro --slurm --wait`` exits
   non-zero naming ``register``, and ``promote`` after it is cancelled, not left pending;
3. ``med-idefics seeds 7 2026 --slurm --wait`` (short recipes, ``-S``: the seeds check plumbing, not science): two
   DVC experiments that ``dvc exp show`` lists and ``med-idefics compare --from-mlflow`` reads;
4. ``mlflow run . -e stage1 --backend med-idefics-slurm`` with ``cluster.slurm.gpus_per_training: 2``: torchrun, two
   processes (gloo on the CPU) in one job; the run ends FINISHED, tagged with its job id, and stage 1 took half the
   optimizer steps one process takes.

Prints each step's time; exits non-zero at the first check that fails.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "tests")]
from paper_smoke import copy_working_tree, smoke_env  # noqa: E402
from paper_smoke import run as smoke_run  # noqa: E402
from slurm_cluster import SlurmCluster, unavailable_reason  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEST = REPO / "outputs" / "slurm-smoke"
SEEDS = (7, 2026)
SHORT = ["model.pretrain.steps=100", "model.pretrain.focus_steps=20", "sweep.sizes=[]", "stage1.max_steps=10",
         "stage2.max_steps=10", "single_stage.max_steps=10"]  # fmt: skip
run = functools.partial(smoke_run, label="slurm-smoke")  # each command shown, timed, checked
DDP_SIZE, DDP_EPOCHS, MICRO_BATCH = 512, 1, 16  # above the sweep sizes (params check); stage1 micro_batch


def main() -> None:
    reason = unavailable_reason()
    if reason:
        sys.exit(f"slurm-smoke: no cluster can be started here: {reason}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="slurm-") as folder:  # short: munge's socket path has a length limit
        cluster = SlurmCluster(Path(folder))
        cluster.start()
        try:
            smoke(DEST.resolve(), {**smoke_env(DEST.resolve()), **cluster.env})
        finally:
            cluster.stop()
    print(f"slurm-smoke: green in {time.monotonic() - started:.0f} s ({DEST})")


def smoke(dest: Path, env: dict[str, str]) -> None:
    if dest.exists():  # a fresh copy each time: a run before this one left outputs, a DVC cache, experiments
        shutil.rmtree(dest)
    copy_working_tree(REPO, dest)
    params = dest / "params.yaml"
    params.write_text(params.read_text().replace("sqlite_single_node: false", "sqlite_single_node: true"))
    run(["med-idefics", "data", "demo"], dest, env)
    run(["git", "add", "-A"], dest, env)  # committed, as a user commits before submitting (the registry's rule)
    run(
        ["git", "-c", "user.name=slurm-smoke", "-c", "user.email=slurm-smoke@localhost", "commit", "-qm", "smoke"],
        dest,
        env,
    )

    out = run(["med-idefics", "repro", "--slurm", "--wait"], dest, env, capture=True)
    check("submitted" in out and "dvc status: every stage up to date" in out, "repro --slurm --wait ran every stage")
    checks = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "demo"]
    run([*checks, "tests/test_demo_results.py", "tests/test_demo_mlflow.py"], dest, env)
    status = run(["dvc", "status"], dest, env, capture=True)
    check("up to date" in status, "dvc status is clean after the jobs")

    text = params.read_text()
    params.write_text(text.replace("model_name: med-idefics-vqa", "model_name: bad/name"))
    out = run(["med-idefics", "repro", "--slurm", "--wait"], dest, env, capture=True, expect_failure=True)
    params.write_text(text)
    check("Error: stage register failed" in out, "a failed stage ends the command, naming it")
    check("CANCELLED promote was cancelled: a stage it depends on failed" in out, "its dependent is cancelled")
    queue = run(["squeue", "--noheader", "--states=PD,R"], dest, env, capture=True)
    check(not queue.strip(), "no job is left pending or running")

    sets = [option for item in SHORT for option in ("-S", item)]
    run(["med-idefics", "seeds", *map(str, SEEDS), "--slurm", "--wait", *sets], dest, env)
    shown = run(["dvc", "exp", "show", "--no-pager", "--json"], dest, env, capture=True)
    for seed in SEEDS:
        check(f'"seed-{seed}"' in shown, f"dvc exp show lists the experiment seed-{seed}")
    command = ["med-idefics", "compare", "--from-mlflow", "--any-config", "--json"]
    compared = json.loads(subprocess.run(command, cwd=dest, env=env, capture_output=True, text=True, check=True).stdout)
    check(set(SEEDS) <= set(compared["seeds"]), f"compare --from-mlflow reads seeds {SEEDS}: {compared['seeds']}")

    config = dest / "outputs" / "slurm-smoke-backend.json"
    config.write_text(json.dumps({"set": ["cluster.slurm.gpus_per_training=2"]}))
    backend = ["--backend", "med-idefics-slurm", "--backend-config", str(config), "--env-manager", "local"]
    parameters = ["-P", f"train_size={DDP_SIZE}", "-P", f"epochs={DDP_EPOCHS}"]
    run(["mlflow", "run", ".", "-e", "stage1", *parameters, *backend], dest, env)
    ddp_run = wait_for_entry_point_run(dest, env, "stage1")
    check(ddp_run["status"] == "FINISHED", f"the stage1 entry point's run ended FINISHED ({ddp_run['status']})")
    check(ddp_run["job"].isdigit(), f"the run is tagged with its Slurm job id ({ddp_run['job']})")
    summary = json.loads((dest / "outputs" / "mlproject" / "stage1" / "train_summary.json").read_text())
    steps = math.ceil(DDP_SIZE / (2 * MICRO_BATCH)) * DDP_EPOCHS
    check(summary["optimizer_steps"] == steps, f"two processes: {steps} steps ({summary['optimizer_steps']})")
    log = next((dest / "outputs" / "logs").glob("mlflow-stage1-*.log")).read_text()
    check("--nproc-per-node=2" in log, "torchrun started two processes in the job")


def wait_for_entry_point_run(dest: Path, env: dict[str, str], entry_point: str, timeout: float = 600) -> dict:
    """`mlflow run --backend` returns once the job is submitted: the run's end, as the job wrote it."""
    script = (
        "import json, mlflow, sys\n"
        "mlflow.set_tracking_uri('sqlite:///mlflow.db')\n"
        "c = mlflow.MlflowClient(); e = c.get_experiment_by_name('med-idefics').experiment_id\n"
        f"r = c.search_runs([e], \"tags.`mlflow.project.entryPoint` = '{entry_point}'\")[0]\n"
        "print(json.dumps({'status': r.info.status, 'job': r.data.tags.get('slurm_job_id', '')}))\n"
    )
    deadline = time.monotonic() + timeout
    while True:
        found = json.loads(subprocess.run([sys.executable, "-c", script], cwd=dest, env=env, capture_output=True,
                                          text=True, check=True).stdout)  # fmt: skip
        if found["status"] not in ("SCHEDULED", "RUNNING") or time.monotonic() > deadline:
            return found
        time.sleep(5)


def check(ok: bool, what: str) -> None:
    print(f"slurm-smoke: {'ok' if ok else 'FAILED'}: {what}", flush=True)
    if not ok:
        sys.exit(f"slurm-smoke: failed: {what}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
