"""``python -m med_idefics.workflow.jobsignal USR1``: send a signal to this Slurm job's training processes on this node.

A training job's batch shell runs ``dvc repro --single-item <stage>``, which runs ``med-idefics train …`` (under
``torchrun``: its workers). Slurm sends USR1 to the batch shell before the time limit; DVC forwards no signal, and
USR1 kills a Python process that set no handler for it — DVC, torchrun's agent, a DataLoader worker. So the signal
goes to the training processes alone: the Python processes of this job (``$SLURM_JOB_ID`` in their environment)
whose command line is ``… med-idefics train …`` or ``… -m med_idefics.cli train …``, not torchrun's agent, and not
a process whose parent is one of them (DataLoader workers forked from a training keep its command line).
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
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


def training_processes(job_id: str, proc: Path = PROC) -> list[int]:
    """The pids of ``job_id``'s training processes on this node (see the module docstring)."""
    found: dict[int, int] = {}  # pid → parent pid
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        environ = _read(entry, "environ").split(b"\0")
        if f"SLURM_JOB_ID={job_id}".encode() not in environ:
            continue
        argv = [word.decode(errors="replace") for word in _read(entry, "cmdline").split(b"\0") if word]
        if is_training(argv):
            stat = _read(entry, "stat").decode(errors="replace")
            found[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1]) if ")" in stat else 0
    return sorted(pid for pid, parent in found.items() if parent not in found)


def main(argv: list[str]) -> int:
    name = argv[0] if argv else "USR1"
    signum = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        print("jobsignal: $SLURM_JOB_ID is not set: run inside a Slurm job", file=sys.stderr)
        return 2
    pids = training_processes(job_id)
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            continue
    host = os.uname().nodename.split(".")[0]
    print(f"[med-idefics] {signum.name} to the training processes on {host}: {pids or 'none running'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
