"""``med-idefics seeds 7 2026``: the pipeline again at other training seeds, each a DVC experiment of its own.

Each seed is ``dvc exp run -n seed-<N> -S seed=<N> -S mlflow.tracking_uri=<the store>``: DVC runs it in a temporary
copy of the repository of its own (never two experiments in one working copy), and its runs go to the store pinned in
its params (in a copy the environment cannot say where runs belong; :func:`med_idefics.tracking.store.
resolve_tracking_uri`). With ``--slurm`` each seed is one Slurm job running ``dvc exp run --temp`` (its whole
pipeline, one stage after another, with ``cluster.slurm.seed``'s resources); without, the seeds are queued for
``dvc queue start``. Afterwards ``dvc exp show`` lists them and ``med-idefics compare --from-mlflow`` reads them.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from med_idefics.config import ConfigError, Params
from med_idefics.workflow.pipeline import LOG_DIR
from med_idefics.workflow.slurm import Job, gpus_for


def pinned_store(params: Params) -> str:
    """The tracking URI written into each seed's params: the one this checkout logs to, never with a password in it
    (it would be committed into the experiment)."""
    from med_idefics.tracking.store import resolve_tracking_uri

    uri = resolve_tracking_uri(params)
    if urlsplit(uri).password:
        raise ConfigError(
            "the tracking URI holds a password, which would be written into every experiment's params.yaml: put the "
            "credentials in $MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD and the URI without them"
        )
    return uri


def experiment_arguments(seed: int, store: str, sets: list[str]) -> list[str]:
    arguments = ["-n", f"seed-{seed}", "-S", f"seed={seed}", "-S", f"mlflow.tracking_uri={store}"]
    for item in sets:
        arguments += ["-S", item]
    return arguments


def seed_job(seed: int, store: str, sets: list[str], params: Params, log_dir: Path) -> Job:
    command = shlex.join(
        [sys.executable, "-m", "dvc", "exp", "run", "--temp", *experiment_arguments(seed, store, sets)]
    )
    gpus, _ = gpus_for(params.cluster.slurm, "seed")
    return Job(f"seed-{seed}", command, "seed", log_dir / f"seed-{seed}.log", gpus=gpus)


def run_seeds(
    seeds: list[int],
    params: Params,
    sets: list[str],
    slurm: bool = False,
    wait: bool = False,
    dry_run: bool = False,
    log_dir: Path = LOG_DIR,
    echo: Callable[[str], None] = print,
) -> list[str]:
    """Queue (or, ``slurm``, submit) one experiment per seed; returns the job ids (Slurm) or the experiment names."""
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {seeds}: each seed once")
    store = pinned_store(params)
    if not slurm:
        for seed in seeds:
            command = [sys.executable, "-m", "dvc", "exp", "run", "--queue", *experiment_arguments(seed, store, sets)]
            if dry_run:
                echo(shlex.join(command))
            elif subprocess.run(command).returncode != 0:
                raise ConfigError(f"seed {seed}: `dvc exp run --queue` failed (its output is above)")
        if not dry_run:
            echo(f"{len(seeds)} experiments queued: `dvc queue start` runs them (`dvc queue status`, `dvc exp show`)")
        return [f"seed-{seed}" for seed in seeds]
    from med_idefics.workflow.cluster import follow, submit_all
    from med_idefics.workflow.cluster_checks import check_cluster
    from med_idefics.workflow.slurm import batch_script, require_slurm

    if not dry_run:
        require_slurm()
        check_cluster(params)
    jobs = [seed_job(seed, store, sets, params, log_dir) for seed in seeds]
    repo = Path.cwd()
    if dry_run:
        for job in jobs:
            echo(f"# {job.name}: sbatch --parsable\n{batch_script(job, params.cluster.slurm, repo)}")
        return []
    submitted = submit_all(jobs, {}, params, repo, echo)
    if wait:
        follow({job.name: (job, submitted[job.name]) for job in jobs}, echo, noun="experiment")
        echo(f"{len(jobs)} experiments done: `dvc exp show`, `med-idefics compare --from-mlflow`")
    else:
        ids = " ".join(submitted.values())
        echo(f"Follow: `squeue --jobs={ids.replace(' ', ',')}`, {log_dir}/seed-<N>.log; cancel: `scancel {ids}`")
    return list(submitted.values())
