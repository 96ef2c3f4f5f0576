"""Several GPUs for one training: ``med-idefics train`` starts itself again under ``$MED_IDEFICS_LAUNCHER``.

A training stage runs as DVC runs it (``dvc repro --single-item <stage>`` → ``med-idefics train …``), so the batch
script of a multi-GPU job (:mod:`med_idefics.workflow.slurm`) cannot put torchrun in front of the command; it sets
``MED_IDEFICS_LAUNCHER`` (``torchrun --standalone --nproc-per-node=4``; on several nodes ``srun … torchrun …`` with a
c10d rendezvous on the first node), and the training replaces itself with ``<launcher> -m med_idefics.cli train …``:
one process per GPU, rank 0 logging to MLflow and writing the adapter as today. A process torchrun started (it sets
``LOCAL_RANK``) never relaunches.
"""

from __future__ import annotations

import os
import shlex
import sys

LAUNCHER_VAR = "MED_IDEFICS_LAUNCHER"


def launch_command(argv: list[str], environ: dict[str, str]) -> list[str] | None:
    """The command to exec instead of this one (``argv``: ``med-idefics train …``), or None to go on here."""
    launcher = environ.get(LAUNCHER_VAR, "").strip()
    if not launcher or "LOCAL_RANK" in environ:
        return None
    return [*shlex.split(launcher), "-m", "med_idefics.cli", *argv[1:]]


def relaunch_if_asked() -> None:
    command = launch_command(sys.argv, dict(os.environ))
    if command is not None:
        print(f"[med-idefics] {shlex.join(command)}", flush=True)
        os.execvp(command[0], command)
