"""Slurm jobs: one batch script for every job we submit, and the scheduler's own commands to submit, follow and cancel
them (``sbatch --parsable``, ``squeue``, ``sacct``, ``scancel``). Slurm is the scheduler; nothing here schedules.

``med-idefics repro --slurm`` (:mod:`med_idefics.workflow.cluster`), ``med-idefics seeds --slurm``
(:mod:`med_idefics.workflow.seeds`) and the MLflow backend (:mod:`med_idefics.workflow.mlflow_backend`) all describe
a :class:`Job` — a shell command run in the checkout, the kind of job it is (``cluster.slurm.<kind>`` holds its time,
memory and CPUs), its log — and submit it with :func:`submit`. The script:

- activates the Python environment ``med-idefics`` runs in (a venv's ``bin/activate``; else its ``bin`` first on
  ``PATH``), runs in the checkout (``--chdir``; the repository sits on a filesystem every node shares), exports the
  login shell's environment (``--export=ALL``: ``$HF_TOKEN`` and ``$MLFLOW_TRACKING_URI`` reach the job without ever
  being written into the script), and with ``cluster.slurm.offline`` keeps the hub offline (the login node fetched);
- for a training job: asks for GPUs ``--gres=<gres>:<n>``, starts ``torchrun`` (one process per GPU, c10d rendezvous
  on the first node) when there are several (:mod:`med_idefics.workflow.launch`), and is requeueable: Slurm sends the
  batch shell USR1 ``requeue_signal_seconds`` before the time limit (``--signal=B:USR1@…``); the shell forwards it to
  the training processes (:mod:`med_idefics.workflow.jobsignal`; DVC, which runs the training, forwards no signal),
  which checkpoint and exit 75 (EX_TEMPFAIL); the shell then requeues the job (``scontrol requeue``), which resumes.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from med_idefics.config import SlurmConfig, SlurmResources

CHECKPOINTED = 75  # EX_TEMPFAIL: the training saved a checkpoint on USR1/SIGTERM and stopped; requeue the job
JOB_PREFIX = "med-idefics:"
OK_STATE = "COMPLETED"
WAITING_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESV_DEL_HOLD"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING", "STOPPED"}


class SlurmError(RuntimeError):
    """Slurm is missing, refused a job, or a job failed: the message names the job (the stage) and the fix."""


@dataclass
class Job:
    """One job: ``command`` run in ``repo`` with ``cluster.slurm.<kind>``'s resources, its output in ``log``."""

    name: str  # the stage (or entry point, or seed-<N>): in the job's name and every message about it
    command: str  # a shell command line
    kind: str  # base | train | evaluate | other | seed
    log: Path
    trains: bool = False  # a training: torchrun over several GPUs, USR1 → checkpoint → requeue
    gpus: int = 0
    nodes: int = 1
    epilogue: str | None = None  # run after the command, with its exit status in $status (also on scancel's TERM)


def kind_of(command: str) -> str:
    """The kind of job a ``med-idefics …`` command line is: ``train``, ``evaluate``, ``base``, else ``other``."""
    words = shlex.split(command)
    verb = words[1] if len(words) > 1 and Path(words[0]).name == "med-idefics" else ""
    return verb if verb in ("train", "evaluate", "base") else "other"


def resources(settings: SlurmConfig, kind: str) -> SlurmResources:
    return getattr(settings, kind)


def gpus_for(settings: SlurmConfig, kind: str) -> tuple[int, int]:
    """(GPUs per node, nodes) a kind of job asks for: only training and evaluation ever get a GPU; a seed's job (its
    whole pipeline, one stage after another) what its training needs, on one node."""
    if kind == "train":
        return settings.gpus_per_training, settings.nodes_per_training
    if kind == "evaluate":
        return settings.gpus_per_evaluation, 1
    if kind == "seed":
        return max(settings.gpus_per_training, settings.gpus_per_evaluation), 1
    return 0, 1


def sbatch_options(job: Job, settings: SlurmConfig, repo: Path) -> list[str]:
    """The ``#SBATCH`` options of ``job``, as ``--key=value`` strings."""
    res = resources(settings, job.kind)
    options = [
        f"--job-name={JOB_PREFIX}{job.name}",
        f"--output={job.log.resolve()}",
        "--open-mode=append",  # a requeued job goes on in the same log
        f"--chdir={repo.resolve()}",
        "--export=ALL",  # the login shell's environment: $HF_TOKEN, $MLFLOW_TRACKING_URI, … never written here
        f"--time={res.minutes}",
        f"--mem={res.mem}",
        f"--cpus-per-task={res.cpus}",
        "--ntasks-per-node=1",
    ]
    options += [f"--{key}={value}" for key in ("partition", "account", "qos") if (value := getattr(settings, key))]
    if job.gpus:
        options.append(f"--gres={settings.gres}:{job.gpus}")
    if job.nodes > 1:
        options.append(f"--nodes={job.nodes}")
    if job.trains:
        options += ["--requeue", f"--signal=B:USR1@{settings.requeue_signal_seconds}"]
    return options + list(settings.extra)


def activation(prefix: Path = Path(sys.prefix)) -> str:
    """The line that puts the job in the Python environment this process runs in."""
    activate = prefix / "bin" / "activate"
    if activate.is_file():
        return f"source {shlex.quote(str(activate))}"
    return f'export PATH={shlex.quote(str(prefix / "bin"))}:"$PATH"'


def launcher(gpus: int, nodes: int) -> str | None:
    """What starts a training over several GPUs (``$MED_IDEFICS_LAUNCHER``), with the job's variables left for the
    batch shell to expand; None for one process."""
    if gpus <= 1 and nodes <= 1:
        return None
    if nodes <= 1:
        return f"torchrun --standalone --nnodes=1 --nproc-per-node={gpus}"
    return (
        f"srun --nodes={nodes} --ntasks-per-node=1 torchrun --nnodes={nodes} --nproc-per-node={gpus} "
        '--rdzv-backend=c10d --rdzv-endpoint="$head:$((29500 + SLURM_JOB_ID % 1000))" --rdzv-id="$SLURM_JOB_ID"'
    )


def batch_script(job: Job, settings: SlurmConfig, repo: Path, prefix: Path = Path(sys.prefix)) -> str:
    """The whole batch script of ``job``. It holds no secret: values come from the environment (``--export=ALL``,
    and what :func:`submit` adds to sbatch's), never from this text."""
    lines = ["#!/bin/bash", *(f"#SBATCH {option}" for option in sbatch_options(job, settings, repo))]
    lines += [f"# med-idefics: {job.name} in {repo.resolve()}", "set -uo pipefail", activation(prefix)]
    lines.append('export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}" PYTHONUNBUFFERED=1')
    if settings.offline:
        lines.append("export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # the login node fetched")
    start = launcher(job.gpus, job.nodes) if job.kind in ("train", "seed") else None
    if start:
        if job.nodes > 1:
            lines.append('head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)')
        lines.append(f'export MED_IDEFICS_LAUNCHER="{start}"  # med-idefics train starts itself under it')
    attempt = "$((${SLURM_RESTART_COUNT:-0} + 1))"
    lines.append(f'echo "[med-idefics] {job.name}: job $SLURM_JOB_ID on $(hostname -s), start {attempt}, $(date -Is)"')
    if job.epilogue:
        lines += [f"epilogue() {{ {job.epilogue}; }}", "trap 'status=143; epilogue; exit 143' TERM  # scancel"]
    lines += _run_and_requeue(job) if job.trains else [job.command, "status=$?"]
    if job.epilogue:
        lines.append("epilogue")
    lines.append('exit "$status"')
    return "\n".join(lines) + "\n"


def _run_and_requeue(job: Job) -> list[str]:
    """Run a training command in the background, forward USR1 to its training processes, requeue the job when it
    checkpointed. ``wait`` returns early when a trapped signal arrives: wait again, for the command's own status.

    Slurm's own SIGTERM (``scancel``, ``scontrol requeue``, preemption, the time limit) reaches every process of the
    job: the training saves a checkpoint; DVC dies of it. The shell outlives it, waits for the training (Slurm kills
    what is left of a job the moment its batch shell exits: the checkpoint would be cut short) and never requeues:
    Slurm has decided already — a second ``scontrol requeue`` is refused while a requeue is under way, but would
    bring back a job that ``scancel`` is ending."""
    log = shlex.quote(str(job.log.resolve()))
    this_start = f'tail -c "+$((logstart + 1))" {log}'
    exited = f"exited with {CHECKPOINTED}"  # what DVC says of a stage command that stopped at a checkpoint
    forward = f"{shlex.quote(sys.executable)} -m med_idefics.workflow.jobsignal"
    wait_trainings = f"{forward} --wait"  # the trainings on this node; the other nodes' end with their own steps
    if job.nodes > 1:  # the training processes of the other nodes are no descendants of this shell
        forward = f'srun --overlap --nodes="$SLURM_NNODES" --ntasks-per-node=1 {forward}'
    return [
        "asked=0 ended=0 interrupted=0 status=",
        "on_usr1() {",
        '  asked=1 interrupted=1; echo "[med-idefics] USR1 (time limit near, or preemption): checkpoint and requeue"',
        f"  {forward} USR1",
        "}",
        "on_term() {",
        '  ended=1 interrupted=1; echo "[med-idefics] SIGTERM: Slurm ends or requeues this job itself (scancel, a '
        'requeue, preemption, the time limit): the training saves a checkpoint"',
        "}",
        "trap on_usr1 USR1",
        "trap on_term TERM",
        f"logstart=$(stat -c %s {log} 2>/dev/null || echo 0)  # this start's lines only, after a requeue",
        f"{job.command} &",
        "child=$!",
        "while :; do",
        '  interrupted=0; wait "$child"; got=$?',
        '  if [ "$got" -eq 127 ] && [ -n "$status" ]; then break; fi  # reaped already: keep its status',
        '  status=$got; [ "$interrupted" = 1 ] || break',
        "done",
        'if [ "$ended" = 1 ]; then',
        f"  {wait_trainings}",
        f'elif [ "$status" -ne 0 ] && {{ [ "$asked" = 1 ] || {this_start} | grep -q "{exited}"; }}; then',
        f'  echo "[med-idefics] {job.name} stopped at a checkpoint (exit $status): requeueing job $SLURM_JOB_ID"',
        "  trap '' TERM  # the requeue's own SIGTERM: nothing is left to stop",
        '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
        '  echo "[med-idefics] scontrol requeue refused: the job ends here (a cancelled job is not requeued)"',
        "fi",
    ]


# --------------------------------------------------------------------------------------------------------------------
# The scheduler's commands


def require_slurm() -> None:
    missing = [name for name in ("sbatch", "squeue", "scancel") if shutil.which(name) is None]
    if missing:
        raise SlurmError(
            f"--slurm: {', '.join(missing)} not found on PATH. Run it on the cluster's login node, where Slurm's "
            "commands are (`module load slurm` on some clusters); on one machine use `med-idefics repro --jobs N`"
        )


def submit(script: str, name: str, after: list[str] = (), env: dict[str, str] | None = None) -> str:
    """``sbatch --parsable`` the script (on stdin: it is never written to a file by us), after ``after`` succeeded
    (``--kill-on-invalid-dep=yes``: cancelled, never left pending, when one of them fails); the job id. ``env``
    reaches the job through sbatch's environment, not the script."""
    command = ["sbatch", "--parsable"]
    if after:
        command += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
    done = subprocess.run(
        command, input=script, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False
    )
    if done.returncode != 0:
        said = done.stderr.strip() or done.stdout.strip()
        raise SlurmError(f"{name}: sbatch refused the job: {said}. {_fix(done.stderr)}")
    return done.stdout.strip().split(";")[0]


def _fix(error: str) -> str:
    text = error.lower()
    for word, key in (("partition", "partition"), ("account", "account"), ("qos", "qos"), ("gres", "gres")):
        if word in text:
            return f"Check cluster.slurm.{key} in params.yaml (`sinfo` lists the partitions and their GPUs)"
    if "time limit" in text:
        return "Lower cluster.slurm.<kind>.minutes to the partition's limit (`sinfo -o '%P %l'`)"
    return "Check cluster.slurm in params.yaml (partition, account, qos, gres, the kinds' minutes/mem/cpus, extra)"


def queued_in(repo: Path) -> dict[str, str]:
    """This user's med-idefics jobs still waiting or running in checkout ``repo``: job id → name."""
    done = subprocess.run(
        ["squeue", "--me", "--noheader", "--states=PD,R,CG,S,CF", "--format=%i|%j|%Z"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    found = {}
    for line in done.stdout.splitlines():
        job, name, folder = [*line.split("|"), "", ""][:3]
        if name.startswith(JOB_PREFIX) and folder and Path(folder).resolve() == repo.resolve():
            found[job] = name.removeprefix(JOB_PREFIX)
    return found


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, check=False)


@dataclass
class JobState:
    state: str  # Slurm's: PENDING, RUNNING, COMPLETED, FAILED, TIMEOUT, CANCELLED, …
    reason: str = ""  # squeue's reason (DependencyNeverSatisfied, NonZeroExitCode, …)
    exit_code: str = ""
    elapsed: str = ""  # Slurm's count of the time the job ran, [days-][hours:]minutes:seconds

    @property
    def finished(self) -> bool:
        return self.state not in WAITING_STATES | RUNNING_STATES


def states(job_ids: list[str]) -> dict[str, JobState]:
    """The state of each job: ``squeue --states=all`` (finished jobs stay there ``MinJobAge``, 5 minutes by
    default), else ``sacct`` (accounting, where the cluster keeps it). A job neither knows is missing."""
    found: dict[str, JobState] = {}
    if not job_ids:
        return found
    queue = subprocess.run(
        ["squeue", "--noheader", "--states=all", f"--jobs={','.join(job_ids)}", "--format=%i|%T|%r|%M"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    for line in queue.stdout.splitlines():
        job, state, reason, elapsed = [*line.split("|"), "", "", ""][:4]
        if job.strip() in job_ids:
            found[job.strip()] = JobState(state.strip(), reason.strip(), elapsed=elapsed.strip())
    missing = [job for job in job_ids if job not in found]
    if missing and shutil.which("sacct"):
        accounted = subprocess.run(
            ["sacct", "--noheader", "--parsable2", "-X", f"--jobs={','.join(missing)}",
             "--format=JobID,State,ExitCode,Elapsed"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        for line in accounted.stdout.splitlines():
            job, state, code, elapsed = [*line.split("|"), "", "", ""][:4]
            if job in missing:
                found[job] = JobState(state.split()[0] if state else "", "", code, elapsed)
    return found


def failure(name: str, kind: str, state: JobState, log: Path) -> str:
    """What went wrong with a finished job, and what to do: for a message naming the stage."""
    if state.state == "TIMEOUT":
        return f"{name} ran past its time limit: raise cluster.slurm.{kind}.minutes (log: {log})"
    if state.state == "OUT_OF_MEMORY":
        return f"{name} ran out of memory: raise cluster.slurm.{kind}.mem (log: {log})"
    if state.state == "CANCELLED" and "Dependency" in state.reason:
        return f"{name} was cancelled: a stage it depends on failed"
    if state.state == "CANCELLED":
        return f"{name} was cancelled (scancel, or the cluster's administrators); rerun to go on"
    if state.state == "UNKNOWN":
        return f"{name}: Slurm no longer knows the job (gone from squeue, no accounting for sacct); see its log {log}"
    if state.state in ("NODE_FAIL", "BOOT_FAIL", "PREEMPTED", "DEADLINE"):
        return f"{name} ended {state.state} (the cluster, not the stage): rerun to go on (log: {log})"
    said = f"{state.state}{', ' + state.reason if state.reason else ''}"
    return f"{name} failed ({said}): its log {log} says why; once fixed, submit again (what is up to date stays)"
