"""``mlflow run . -e stage2 --backend med-idefics-slurm --backend-config configs/slurm-backend.json --env-manager
local``: an MLproject entry point as a Slurm job, in the Python environment ``mlflow run`` itself runs in.

MLflow's backend-plugin interface (entry point ``mlflow.project_backend``, :class:`AbstractBackend`) is the seam. The
job is the batch script of ``med-idefics repro --slurm`` (:mod:`med_idefics.workflow.slurm`): the entry point's
command instead of a DVC stage, ``cluster.slurm``'s resources for its kind (``train`` for stage1/stage2/single_stage,
with torchrun over several GPUs; ``evaluate``; ``base``; ``other``), the venv activated, ``$HF_TOKEN`` from the
environment. ``$MLFLOW_RUN_ID`` and ``$MLFLOW_TRACKING_URI`` reach the job through sbatch's environment, so the entry
point's stage adopts the run ``mlflow run`` opened; the run is tagged ``slurm_job_id``, is SCHEDULED while the job
waits, and its status follows the job's. ``mlflow run`` does not wait for a plugin backend's run (its CLI returns once
the job is submitted), so the job ends the run itself: after the command (or on scancel's TERM) :func:`end_run` sets
FINISHED, FAILED or KILLED from the command's exit status unless the stage already ended it; a job cancelled before
it started leaves the run SCHEDULED, never RUNNING. ``mlflow.projects.run(…, synchronous=True)`` follows the job as
``repro --slurm --wait`` does.

The backend config (a JSON file) holds ``set``: ``cluster.slurm.*`` overrides for this job, e.g.
``["cluster.slurm.partition=gpu"]``; and optionally ``log_dir`` (default ``outputs/logs``). A project with conda
(``--env-manager conda``) goes through the ``mlflow-slurm`` plugin instead: ``pip install -e .[cluster]``,
``--backend slurm`` (two plugins cannot both be named ``slurm``: MLflow takes the first one installed).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

from mlflow.entities import RunStatus
from mlflow.exceptions import ExecutionException
from mlflow.projects.backend.abstract_backend import AbstractBackend
from mlflow.projects.submitted_run import SubmittedRun
from mlflow.projects.utils import (
    PROJECT_ENV_MANAGER,
    fetch_and_validate_project,
    get_entry_point_command,
    get_or_create_run,
    load_project,
)

_logger = logging.getLogger(__name__)
NAME = "med-idefics-slurm"
JOB_STATUS = {"COMPLETED": RunStatus.FINISHED, "CANCELLED": RunStatus.KILLED}  # any other end: FAILED


def backend() -> AbstractBackend:
    """The ``mlflow.project_backend`` entry point's builder."""
    return SlurmBackend()


class SlurmBackend(AbstractBackend):
    def run(self, project_uri, entry_point, params, version, backend_config, tracking_uri, experiment_id):
        from mlflow import MlflowClient

        from med_idefics.config import PARAMS_FILE, load_params
        from med_idefics.workflow.cluster_checks import check_tracking_store
        from med_idefics.workflow.slurm import Job, SlurmError, batch_script, gpus_for, kind_of, require_slurm, submit

        manager = backend_config.get(PROJECT_ENV_MANAGER)
        if manager not in (None, "local"):
            raise ExecutionException(
                f"--backend {NAME} runs the entry point in the environment `mlflow run` runs in: pass --env-manager "
                f"local (got {manager}). For a conda environment: `pip install -e .[cluster]` and --backend slurm"
            )
        work_dir = Path(fetch_and_validate_project(project_uri, version, entry_point, params)).resolve()
        if not Path(project_uri).is_dir():
            raise ExecutionException(
                f"--backend {NAME}: the project must be a checkout on the cluster's shared filesystem: {project_uri}"
            )
        settings = load_params(work_dir / PARAMS_FILE, list(backend_config.get("set", [])))
        try:
            require_slurm()
            check_tracking_store(settings)
        except SlurmError as err:
            raise ExecutionException(str(err)) from err
        project = load_project(str(work_dir))
        (command,) = get_entry_point_command(project, entry_point, params, backend_config.get("STORAGE_DIR"))
        run = get_or_create_run(None, project_uri, experiment_id, str(work_dir), version, entry_point, params)
        run_id = run.info.run_id
        kind = kind_of(command)
        gpus, nodes = gpus_for(settings.cluster.slurm, kind)
        log = work_dir / backend_config.get("log_dir", "outputs/logs") / f"mlflow-{entry_point}-{run_id[:8]}.log"
        end = f'{shlex.quote(sys.executable)} -m med_idefics.workflow.mlflow_backend "$status"'
        job = Job(f"mlflow-{entry_point}", command, kind, log, trains=kind == "train", gpus=gpus, nodes=nodes)
        job.epilogue = end  # `mlflow run --backend` does not wait: the job itself ends the run
        log.parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient()
        env = {"MLFLOW_RUN_ID": run_id, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_EXPERIMENT_ID": experiment_id}
        try:
            job_id = submit(batch_script(job, settings.cluster.slurm, work_dir), job.name, env=env)
        except SlurmError as err:
            client.set_terminated(run_id, "FAILED")
            raise ExecutionException(str(err)) from err
        client.set_tag(run_id, "slurm_job_id", job_id)
        client.update_run(run_id, status="SCHEDULED")
        _logger.info("=== Submitted %s as Slurm job %s (log: %s) ===", entry_point, job_id, log)
        return SlurmSubmittedRun(run_id, job_id, job)


class SlurmSubmittedRun(SubmittedRun):
    """A submitted job; :meth:`wait` follows it as ``repro --slurm --wait`` follows its jobs."""

    def __init__(self, run_id: str, job_id: str, job) -> None:
        super().__init__()
        self._run_id, self.job_id, self.job = run_id, job_id, job

    @property
    def run_id(self) -> str:
        return self._run_id

    def wait(self) -> bool:
        from med_idefics.workflow.cluster import follow
        from med_idefics.workflow.slurm import SlurmError

        try:
            follow({self.job.name: (self.job, self.job_id)}, echo=print, noun="entry point")
        except SlurmError as err:
            _logger.error("%s", err)
        except BaseException:
            self.cancel()
            raise
        return self._end_run() == RunStatus.FINISHED

    def get_status(self) -> str:
        from med_idefics.workflow.slurm import states

        state = states([self.job_id]).get(self.job_id)
        if state is None or not state.finished:
            return RunStatus.to_string(RunStatus.RUNNING if state and state.state == "RUNNING" else RunStatus.SCHEDULED)
        return RunStatus.to_string(JOB_STATUS.get(state.state, RunStatus.FAILED))

    def cancel(self) -> None:
        from med_idefics.workflow.slurm import cancel

        cancel([self.job_id])
        self._end_run(RunStatus.KILLED)

    def _end_run(self, status: int | None = None) -> int:
        """The run's status after the job: what the stage ended it with, else the job's (a job killed before its
        stage could end the run, or cancelled while it waited)."""
        from mlflow import MlflowClient

        client = MlflowClient()
        current = RunStatus.from_string(client.get_run(self._run_id).info.status)
        if RunStatus.is_terminated(current):
            return current
        if status is None:
            status = RunStatus.from_string(self.get_status())
            status = status if RunStatus.is_terminated(status) else RunStatus.FAILED
        client.set_tag(self._run_id, "slurm_job_ended", self.get_status())
        client.set_terminated(self._run_id, RunStatus.to_string(status))
        return status


def end_run(status: int, run_id: str | None = None) -> str:
    """In the job, after the entry point's command: end the run from its exit status, unless the stage did."""
    from mlflow import MlflowClient

    client = MlflowClient()
    run_id = run_id or os.environ["MLFLOW_RUN_ID"]
    current = client.get_run(run_id).info.status
    if RunStatus.is_terminated(RunStatus.from_string(current)):
        return current
    ended = "FINISHED" if status == 0 else "KILLED" if status in (130, 143) else "FAILED"
    client.set_tag(run_id, "slurm_exit_status", str(status))
    client.set_terminated(run_id, ended)
    return ended


if __name__ == "__main__":
    print(f"[med-idefics] MLflow run {os.environ.get('MLFLOW_RUN_ID')}: {end_run(int(sys.argv[1]))}", flush=True)
