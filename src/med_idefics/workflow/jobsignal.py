"""``python -m med_idefics.workflow.jobsignal USR1``: send a signal to this Slurm job's training processes on this node;
``… jobsignal --wait``: wait until they have ended.

A training job's batch shell runs ``dvc repro --single-item <stage>``, which runs ``med-idefics train …`` (under
``torchrun``: its workers). Slurm sends USR1 to the batch shell before the time limit; DVC forwards no signal, and
USR1 kills a Python process that set no handler for it — DVC, torchrun's agent, a DataLoader worker. So the signal
goes to the training processes alone: the Python processes of this job (``$SLURM_JOB_ID`` in their environment)
whose command line is ``… med-idefics train …`` or ``… -m med_idefics.cli train …``, not torchrun's agent, and not
a process whose parent is one of them (DataLoader workers forked from a training keep its command line). Where
``$SLURM_CONF`` is set, only processes of the same cluster's job (several test clusters on one machine number their
jobs alike).

``--wait`` is for Slurm's own SIGTERM (``scancel``, ``scontrol requeue``, preemption, the time limit): it reaches every
process of the job, DVC included, which dies of it; the training finishes its step and saves a checkpoint. Slurm kills
whatever is left of a job the moment its batch shell exits, so the shell waits here for the trainings first (Slurm's
``KillWait`` later ends the wait, and them, if they take too long).
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time
from pathlib import Path

PROC = Path("/proc")


def is_training(argv: list[str]) -> bool:
    """A ``med-idefics train`` process (or a torchrun worker of one), not torchrun's agent."""
    if not argv or not Path(argv[0]).name.startswith("python"):
        return False
    if any(Path(word).name == "torchrun" or word == "torch.distributed.run" for word in argv):
        return False
    return any(
        (Path(word).name == "med-idefics" or word == "med_idefics.cli") and following == "train"
        for word, following in itertools.pairwise(argv)
    )


def _read(process: Path, name: str) -> bytes:
    try:
        return (process / name).read_bytes()
    except OSError:  # gone, or not ours
        return b""


def training_processes(job_id: str, proc: Path = PROC, conf: str | None = None) -> list[int]:
    """The pids of ``job_id``'s training processes on this node (see the module docstring); with ``conf``, only those
    whose ``$SLURM_CONF`` is ``conf``."""
    found: dict[int, int] = {}  # pid → parent pid
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        environ = _read(entry, "environ").split(b"\0")
        if f"SLURM_JOB_ID={job_id}".encode() not in environ:
            continue
        if conf and f"SLURM_CONF={conf}".encode() not in environ:
            continue
        argv = [word.decode(errors="replace") for word in _read(entry, "cmdline").split(b"\0") if word]
        if is_training(argv):
            stat = _read(entry, "stat").decode(errors="replace")
            found[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1]) if ")" in stat else 0
    return sorted(pid for pid, parent in found.items() if parent not in found)


def wait_for_trainings(job_id: str, conf: str | None = None, poll_s: float = 0.2) -> list[int]:
    """Return once ``job_id``'s training processes on this node have ended; the pids there were."""
    pids = training_processes(job_id, conf=conf)
    while any(_alive(pid) for pid in pids):
        time.sleep(poll_s)
    return pids


def _alive(pid: int, proc: Path = PROC) -> bool:
    state = _read(proc / str(pid), "stat").decode(errors="replace")
    return bool(state) and state.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended: its parent reaps it


def main(argv: list[str]) -> int:
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        print("jobsignal: $SLURM_JOB_ID is not set: run inside a Slurm job", file=sys.stderr)
        return 2
    conf = os.environ.get("SLURM_CONF")
    host = os.uname().nodename.split(".")[0]
    if argv[:1] == ["--wait"]:
        started = time.monotonic()
        pids = wait_for_trainings(job_id, conf)
        waited = f"ended after {time.monotonic() - started:.1f} s" if pids else "none running"
        print(f"[med-idefics] the training processes on {host}: {waited}", flush=True)
        return 0
    name = argv[0] if argv else "USR1"
    signum = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    pids = training_processes(job_id, conf=conf)
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            continue
    print(f"[med-idefics] {signum.name} to the training processes on {host}: {pids or 'none running'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
