"""Preemption and time limits: what a scheduler's signal does to a training stage.

A cluster ends long jobs on its own schedule: Slurm sends SIGTERM when it preempts a job (and at its time limit),
and SIGUSR1 ahead of the time limit to a job that asks for it (``#SBATCH --signal=B:USR1@300``: five minutes
before, to the batch shell, which forwards it to the step). While :meth:`PreemptionRequest.catching` is in force,
either signal only records that it came (a handler that raised at an arbitrary bytecode would tear a checkpoint
half-written); the training loop looks between optimizer steps
(:class:`~med_idefics.modeling.trainer_support.StopOnPreemption`), saves a checkpoint at the current step, ends its
MLflow run KILLED with the tags of :meth:`Preempted.tags`, and the process exits with :data:`EXIT_REQUEUE`. A batch
script requeues the job on that status (``scontrol requeue $SLURM_JOB_ID``); the rerun of the same command resumes
from that checkpoint, its run tagged with the run and step it continues (:func:`resumed_tags`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)
# The exit status of a stage stopped by preemption or a time limit after saving its state: sysexits.h EX_TEMPFAIL,
# "temporary failure, try again". Job scripts requeue on it; any other non-zero status is a failure to look at.
EXIT_REQUEUE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# Tags of the run a preemption ended, and of the run that continues it (both in the MLflow UI's run page).
KILLED_BY = "killed_by"
PREEMPTED_AT_STEP = "preempted_at_step"
PREEMPTED_CHECKPOINT = "preempted_checkpoint"
RESUMED_BY = "resumed_by_run_id"
RESUMED_FROM_RUN = "resumed_from_run_id"
RESUMED_FROM_STEP = "resumed_from_step"
RESUMED_FROM_CHECKPOINT = "resumed_from_checkpoint"
NOTE = "mlflow.note.content"  # the run's description in the MLflow UI


class Preempted(SystemExit):
    """The stage stopped on a preemption signal after saving its state; exits with :data:`EXIT_REQUEUE`."""

    def __init__(self, signal_name: str, step: int, checkpoint: str | None) -> None:
        super().__init__(EXIT_REQUEUE)
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint

    def tags(self) -> dict[str, str]:
        where = f"checkpoint {self.checkpoint}" if self.checkpoint else "no checkpoint (stopped before its first step)"
        note = (
            f"Stopped by {self.signal_name} at step {self.step}: {where}. Run the same command again (a batch script "
            f"requeues on exit status {EXIT_REQUEUE}) to resume from it."
        )
        tags = {KILLED_BY: self.signal_name, PREEMPTED_AT_STEP: str(self.step), NOTE: note}
        return tags | ({PREEMPTED_CHECKPOINT: self.checkpoint} if self.checkpoint else {})

    def __str__(self) -> str:
        return self.tags()[NOTE]


def resumed_tags(run_id: str | None, step: int, checkpoint: str) -> dict[str, str]:
    """Tags of a run that resumes from ``checkpoint`` (step ``step``), written by run ``run_id``."""
    tags = {RESUMED_FROM_STEP: str(step), RESUMED_FROM_CHECKPOINT: checkpoint}
    continues = f"run {run_id}" if run_id else "a run"
    note = f"Continues {continues} from step {step} ({checkpoint}): its step metrics start at step {step + 1}."
    return tags | {NOTE: note} | ({RESUMED_FROM_RUN: run_id} if run_id else {})


class PreemptionRequest:
    """Whether a preemption signal has come, and which (the first one)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _record(self, signum: int, frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name

    @contextlib.contextmanager
    def catching(self) -> Iterator[PreemptionRequest]:
        """Inside the block, :data:`SIGNALS` are recorded instead of ending the process; the previous handlers are
        restored after it. Outside the main thread (where no handler can be set) the signals keep their effect."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.signal(signum, self._record) for signum in SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def mark_resumed(previous: str, run_id: str) -> None:
    """Point run ``previous``, which a preemption stopped, at run ``run_id`` that continues it (its page in the
    MLflow UI then says so)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        note = client.get_run(previous).data.tags.get(NOTE, "")
        client.set_tag(previous, RESUMED_BY, run_id)
        client.set_tag(previous, NOTE, f"{note} Resumed by run {run_id}.".strip())
    except MlflowException:
        logger.warning("run %s, which run %s resumes, is not in the tracking store", previous, run_id)
