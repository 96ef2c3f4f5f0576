"""``med-idefics repro --slurm``: the pipeline's stages that are not up to date, each a Slurm job.

Each job runs its stage as ``med-idefics repro`` runs it locally, through DVC (``dvc --wait-for-lock repro
--single-item <stage>``: DVC decides, runs, records ``dvc.lock`` and caches), with ``--dependency=afterok:`` on the
jobs of the stages it depends on (DVC's graph) and ``--kill-on-invalid-dep=yes`` (a failed stage's dependents are
cancelled by Slurm, never left pending), named ``med-idefics:<stage>``, its output in ``outputs/logs/<stage>.log``,
its resources from ``cluster.slurm`` (:mod:`med_idefics.workflow.slurm`). Before anything is submitted, the
cluster's realities are checked (:func:`check_cluster`): the tracking store, DVC's lock on a network filesystem, and
a hub base resolved and fetched on the login node (compute nodes often have no network).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from med_idefics.config import ConfigError, Params
from med_idefics.workflow.cluster_checks import check_cluster, prepare_hub_base
from med_idefics.workflow.pipeline import (
    LOG_DIR,
    UP_TO_DATE,
    PipelineError,
    chain_lengths,
    clock,
    last_line,
    log_tail,
)
from med_idefics.workflow.slurm import (
    Job,
    JobState,
    SlurmError,
    batch_script,
    cancel,
    failure,
    gpus_for,
    kind_of,
    queued_in,
    require_slurm,
    states,
    submit,
)

POLL_SECONDS = 10.0  # between two squeue calls while following (Slurm starts the dependent jobs itself)
PROGRESS_EVERY = 60.0  # seconds between progress lines
LOST_AFTER = 6  # polls in a row in which neither squeue nor sacct knows a job


def pipeline_state(repo: Path = Path(".")) -> tuple[dict[str, list[str]], dict[str, str], list[str]]:
    """DVC's view of the pipeline: (stage → the stages it depends on, stage → command, the stages `dvc repro` would
    run — those DVC reports changed and every stage after them — in an order where a stage comes after its deps)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(repo)) as dvc:
            stages = [s for s in dvc.index.stages if not s.is_data_source]
            names = {s: s.addressing for s in stages}
            graph = {names[s]: [names[d] for d in dvc.index.graph.successors(s) if d in names] for s in stages}
            commands = {names[s]: s.cmd for s in stages}
            changed = dvc.status()
    except DvcException as err:
        raise PipelineError(f"cannot read the DVC pipeline in {repo.resolve()}: {err}") from err
    sources = {name: change for name, change in changed.items() if name not in graph}
    if sources:
        raise PipelineError(
            f"the data does not match its record ({sources}): `dvc pull` the recorded data, or `dvc add data` to "
            "record yours, before the stages are submitted"
        )
    order = _topological(graph)
    stale = set(changed)
    for name in order:  # a stage after a stale one is stale: it will read what that one writes
        if any(dep in stale for dep in graph[name]):
            stale.add(name)
    return graph, commands, [name for name in order if name in stale]


def _topological(graph: dict[str, list[str]]) -> list[str]:
    """Every stage after the stages it depends on; among those ready, the one with the longest chain of stages
    after it first (as ``repro --jobs`` starts them): Slurm starts jobs of equal priority in submission order."""
    priority = chain_lengths(graph)
    position = {name: i for i, name in enumerate(graph)}
    order: list[str] = []
    while len(order) < len(graph):
        ready = [n for n in graph if n not in order and all(d in order for d in graph[n])]
        order.append(min(ready, key=lambda n: (-priority[n], position[n])))
    return order


def cluster_params(overrides: list[str]) -> Params:
    """params.yaml with ``--set`` overrides of ``cluster.`` keys only: the stages themselves read params.yaml (DVC
    runs them), so an override of any other key would not reach them."""
    from med_idefics.config import load_params

    other = [item for item in overrides if not item.strip().startswith("cluster.")]
    if other:
        raise ConfigError(
            f"--set {other[0]}: only cluster.* keys can be set here; the stages read params.yaml, so edit it (or "
            "`dvc exp run -S …`) to change anything else"
        )
    return load_params(overrides=overrides)


def stage_job(name: str, command: str, params: Params, log_dir: Path) -> Job:
    kind = kind_of(command)
    gpus, nodes = gpus_for(params.cluster.slurm, kind)
    command = f"dvc --wait-for-lock repro --single-item {name}"
    return Job(name, command, kind, log_dir / f"{name}.log", trains=kind == "train", gpus=gpus, nodes=nodes)


# --------------------------------------------------------------------------------------------------------------------
# Submitting and following


def repro_slurm(
    params: Params,
    wait: bool = False,
    dry_run: bool = False,
    log_dir: Path = LOG_DIR,
    echo: Callable[[str], None] = print,
) -> list[str]:
    """Submit the stages that are not up to date (see the module docstring); with ``wait``, follow them to the end.
    Returns the job ids (none in a dry run)."""
    if not dry_run:
        require_slurm()
        check_cluster(params)
    else:
        try:
            check_cluster(params)
        except ConfigError as err:  # a dry run shows the scripts all the same, and what a submission would say
            echo(f"# a submission would stop here: {err}")
    graph, commands, stale = pipeline_state()
    stale = prepare_hub_base(params, stale, dry_run, echo)
    if not stale:
        echo("every stage is up to date: nothing to submit")
        return []
    jobs = [stage_job(name, commands[name], params, log_dir) for name in stale]
    repo = Path.cwd()
    if dry_run:
        for job in jobs:
            after = [f"<{dep}>" for dep in graph[job.name] if dep in stale]
            echo(f"# {job.name}: sbatch --parsable{_after(after)}")
            echo(batch_script(job, params.cluster.slurm, repo))
        echo(f"# {len(jobs)} jobs (dry run: nothing submitted)")
        return []
    queued = queued_in(repo)
    if queued:
        raise SlurmError(
            f"jobs of this checkout are still queued or running ({', '.join(f'{n} {i}' for i, n in queued.items())}): "
            f"their stages would run twice. Wait for them (`squeue --jobs={','.join(queued)}`) or cancel them "
            f"(`scancel {' '.join(queued)}`), then submit again"
        )
    log_dir.mkdir(parents=True, exist_ok=True)
    submitted = submit_all(jobs, graph, params, repo, echo)
    if not wait:
        ids = " ".join(submitted.values())
        echo(f"{len(submitted)} jobs submitted. Follow: `squeue --jobs={ids.replace(' ', ',')}`, the logs in "
             f"{log_dir}/<stage>.log; cancel: `scancel {ids}`")  # fmt: skip
        return list(submitted.values())
    follow({job.name: (job, submitted[job.name]) for job in jobs}, echo)
    _, _, left = pipeline_state()
    if left:
        raise PipelineError(f"the jobs ended, but DVC still finds these stages out of date: {', '.join(left)}")
    echo("dvc status: every stage up to date")
    return list(submitted.values())


def _after(deps: list[str]) -> str:
    return f" --dependency=afterok:{':'.join(deps)} --kill-on-invalid-dep=yes" if deps else ""


def submit_all(jobs: list[Job], graph: dict[str, list[str]], params: Params, repo: Path, echo) -> dict[str, str]:
    """Submit ``jobs`` in order, each after the jobs of the stages it depends on; all or none: when sbatch refuses
    one, the jobs submitted before it are cancelled."""
    submitted: dict[str, str] = {}
    try:
        for job in jobs:
            after = [submitted[dep] for dep in graph.get(job.name, []) if dep in submitted]
            job.log.parent.mkdir(parents=True, exist_ok=True)
            job.log.write_text("")  # this run's log (a requeued job appends to it)
            submitted[job.name] = submit(batch_script(job, params.cluster.slurm, repo), job.name, after)
            on = f", {job.gpus} GPU{'s' if job.gpus > 1 else ''}" if job.gpus else ""
            echo(f"submitted {job.name}: job {submitted[job.name]}{on}{_after(after)}")
    except BaseException:
        cancel(list(submitted.values()))
        if submitted:
            echo(f"cancelled the {len(submitted)} jobs submitted before: nothing of this run is left queued")
        raise
    return submitted


def follow(jobs: dict[str, tuple[Job, str]], echo: Callable[[str], None] = print, noun: str = "stage") -> None:
    """Follow the jobs to their end, as ``repro --jobs`` follows its stages: a line when a job starts and ends, the
    running ones' latest log line every minute, a failed job's log tail; Ctrl-C (or SIGTERM) cancels what is left.
    Raises :class:`SlurmError` naming the ``noun`` (stage, experiment, …) that failed."""
    from med_idefics.tracking.runs import sigterm_raises

    started = last_progress = time.monotonic()
    seen: dict[str, str] = {}
    missing: dict[str, int] = {}
    failed: dict[str, JobState] = {}
    pending = dict(jobs)
    with sigterm_raises():
        try:
            while pending:
                now = states([job_id for _, job_id in pending.values()])
                for name, (job, job_id) in list(pending.items()):
                    state = now.get(job_id)
                    if state is None:  # left the queue, and no accounting (sacct) to ask: its log says how it ended
                        missing[name] = missing.get(name, 0) + 1
                        if missing[name] < LOST_AFTER:
                            continue
                        state = JobState("UNKNOWN")
                    _report(name, job, job_id, state, seen, started, echo)
                    if state.finished:
                        del pending[name]
                        if state.state != "COMPLETED":
                            failed[name] = state
                if pending and time.monotonic() - last_progress >= PROGRESS_EVERY:
                    last_progress = time.monotonic()
                    for name, (job, _) in pending.items():
                        if seen.get(name) == "RUNNING":
                            echo(f"[{clock(started)}]   {name}: {last_line(job.log)}")
                if pending:
                    time.sleep(POLL_SECONDS)
        except BaseException:
            left = [job_id for _, job_id in pending.values()]
            if left:
                echo(f"[{clock(started)}] cancelling {', '.join(pending)} (jobs {' '.join(left)})")
                cancel(left)
            raise
    if failed:  # the stages that failed, not the dependents Slurm cancelled after them
        cancelled = [n for n, state in failed.items() if "Dependency" in state.reason]
        first, *others = [n for n in failed if n not in cancelled] or list(failed)
        job, job_id = jobs[first]
        also = f"; {', '.join(others)} failed too" if others else ""
        after = f"; cancelled after it: {', '.join(cancelled)}" if cancelled else ""
        raise SlurmError(f"{noun} {failure(first, job.kind, failed[first], job.log)} (job {job_id}){also}{after}")


def _report(name, job, job_id, state: JobState, seen, started, echo) -> None:
    before = seen.get(name)
    phase = "RUNNING" if state.state in ("RUNNING", "COMPLETING") else state.state
    if phase == before:
        return
    seen[name] = phase
    at = f"[{clock(started)}]"
    if phase == "RUNNING":
        echo(f"{at} start {name} (job {job_id}, log: {job.log})")
    elif phase in ("REQUEUED", "PENDING") and before == "RUNNING":
        echo(f"{at} requeued {name} (job {job_id}): it resumes from its checkpoint when it starts again")
    elif phase == "COMPLETED":
        skipped = f"'{name}' {UP_TO_DATE}"  # DVC: "Stage 'x' didn't change, skipping" (not a dep's line)
        note = " (up to date)" if job.log.is_file() and skipped in job.log.read_text(errors="replace") else ""
        echo(f"{at} done {name} in {state.elapsed or '?'}{note}")
    elif state.finished:
        word = "CANCELLED" if state.state == "CANCELLED" else "FAILED"
        echo(f"{at} {word} {failure(name, job.kind, state, job.log)}")
        if job.log.is_file() and job.log.stat().st_size and "Dependency" not in state.reason:
            echo(log_tail(job.log))
