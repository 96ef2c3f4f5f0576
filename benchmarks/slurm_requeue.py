"""What Slurm's requeue of a running training costs, on the test cluster (``tests/slurm_cluster.py``: root, Debian's
``slurm-wlm`` and ``munge``): the training's stop against the cluster's ``KillWait``, and the second start.

    python benchmarks/slurm_requeue.py

The tiny training of ``long_runs.py`` (a tiny base, a small generated dataset) as ``dvc.yaml``'s ``single_stage``,
submitted by ``med-idefics repro --slurm``; once it is past its first checkpoint, ``scontrol requeue`` (Slurm's
SIGTERM to every process of the job, as on preemption). Measured from the requeue: the MLflow run ended KILLED by the
training (the step under way, its checkpoint, the run's end), the training's exit (the batch shell's own line), the
job back in the queue; then its second start (``StartTime=now``: Slurm would hold it ~2 minutes) to COMPLETED.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "tests")]
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def pipeline(repo: Path, overrides: list[str]) -> Path:
    """``repo`` as a git + DVC repository whose pipeline is the shipped ``single_stage`` (its command, params and
    outputs; the data as its dependency); the folder its command trains into."""
    from med_idefics.config import apply_overrides

    params = apply_overrides(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shipped = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["single_stage"]
    stage = {"cmd": shipped["cmd"], "deps": ["data"], "params": shipped["params"], "outs": shipped["outs"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"single_stage": stage}}, sort_keys=False))
    identity = ["-c", "user.name=b", "-c", "user.email=b@b"]
    for command in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"], ["git", "add", "-A"],
                    ["git", *identity, "commit", "-qm", "a training stage"]):  # fmt: skip
        subprocess.run(command, cwd=repo, check=True, capture_output=True)
    return repo / shipped["cmd"].split("--out ")[1].split()[0]


def job(job_id: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return dict(word.partition("=")[::2] for word in shown.split())


def until(condition, seconds: float, what: str) -> float:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"waited {seconds:.0f} s for {what}")
        time.sleep(0.1)
    return time.time()


def requeue(folder: Path) -> dict:
    from long_runs import project
    from mlflow import MlflowClient

    from med_idefics.modeling.checkpoints import scan

    repo = folder / "repo"
    repo.mkdir()
    overrides = [*project(repo), "cluster.slurm.sqlite_single_node=true"]
    store = next(item.split("=", 1)[1] for item in overrides if item.startswith("mlflow.tracking_uri="))
    os.environ["MLFLOW_TRACKING_URI"] = store  # the jobs inherit it (sbatch --export=ALL)
    out = pipeline(repo, overrides)
    log = repo / "outputs" / "logs" / "single_stage.log"
    submitted = subprocess.run([str(BIN / "med-idefics"), "repro", "--slurm"], cwd=repo, capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
    job_id = re.search(r"^submitted single_stage: job (\d+)", submitted, re.MULTILINE).group(1)
    checkpoints = out / "checkpoints"
    until(lambda: checkpoints.exists() and bool(scan(checkpoints)[0]), 600, "the first checkpoint")
    first = scan(checkpoints)[0][0].step
    requeued = time.time()
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    queued = until(lambda: job(job_id)["JobState"] == "PENDING", 120, "the job back in the queue")
    client = MlflowClient(store)
    (killed,) = client.search_runs([client.get_experiment_by_name("med-idefics").experiment_id])
    exited = re.search(r"the training processes on \S+: ended after ([\d.]+) s", log.read_text())
    restarted = time.time()
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)
    completed = until(lambda: job(job_id)["JobState"] == "COMPLETED", 900, "the second start to finish")
    runs = client.search_runs([killed.info.experiment_id], order_by=["attributes.start_time ASC"])
    resumed = runs[-1]
    return {
        "kill_wait": re.search(r"KillWait\s*=\s*(\S+ \S+)", subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout).group(1),
        "first_checkpoint": first,
        "stopped_at": killed.data.tags.get("preempted_at_step", "-"),
        "killed_status": killed.info.status,
        "stop_s": round(killed.info.end_time / 1000 - requeued, 2) if killed.info.end_time else None,
        "exit_s": float(exited.group(1)) if exited else None,
        "queued_s": round(queued - requeued, 1),
        "resumed_from": resumed.data.tags.get("resumed_from_step", "-"),
        "resumed_status": resumed.info.status,
        "second_start_s": round(completed - restarted, 1),
        "restarts": job(job_id)["Restarts"],
    }  # fmt: skip


def main() -> None:
    from slurm_cluster import SlurmCluster, unavailable_reason

    reason = unavailable_reason()
    if reason:
        sys.exit(f"slurm_requeue: no test cluster here: {reason}")
    with tempfile.TemporaryDirectory(prefix="slurm-") as folder:  # short: munge's socket path has a length limit
        cluster = SlurmCluster(Path(folder) / "slurm").start()
        try:
            result = requeue(Path(folder))
        finally:
            cluster.stop()
    print(
        "| KillWait | first checkpoint | requeue → run ended KILLED (step, checkpoint, run end) | → training exited "
        "| → job back in the queue | second start: resumed from step → COMPLETED | Restarts |"
    )
    print("|---|---|---|---|---|---|---|")
    print(f"| {result['kill_wait']} | step {result['first_checkpoint']} | {result['stop_s']} s "
          f"({result['killed_status']}, step {result['stopped_at']}) | {result['exit_s']} s | {result['queued_s']} s "
          f"| {result['resumed_from']} → {result['resumed_status']} in {result['second_start_s']} s "
          f"| {result['restarts']} |")  # fmt: skip


if __name__ == "__main__":
    main()
