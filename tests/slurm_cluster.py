"""A real single-node Slurm cluster in a temporary folder, for tests and ``make slurm-smoke``.

Debian's ``slurm-wlm`` and ``munge`` (``apt-get install -y slurm-wlm munge``; ``.ci/run`` installs them when missing),
run as root: a ``munged`` of its own (its own key and socket: the machine's munge, if any, is left alone), then
``slurmctld`` and ``slurmd`` from a ``slurm.conf`` in the folder, on free ports, one node named ``hostname -s`` with
the machine's CPUs. The tools find it through ``$SLURM_CONF`` (:attr:`SlurmCluster.env`). Jobs start within seconds.
A job's processes are tracked by process group (``proctrack/pgid``: a cgroup, as production clusters track them, is
not ours to make on a shared machine); ``KillWait`` is 5 s (Slurm's default: 30).

The node advertises ``gpus`` GPUs as a generic resource without device files (``Gres=gpu:N``, ``gres.conf``
``Name=gpu Count=N``): Slurm schedules ``--gres=gpu:N`` requests against them — the batch scripts' GPU requests are
tested for real — but there is no device behind them, so the jobs run on the CPU (no ``CUDA_VISIBLE_DEVICES``).

Also a command line, for trying things by hand: ``python tests/slurm_cluster.py start DIR`` (prints the
``export SLURM_CONF=…`` to run) and ``python tests/slurm_cluster.py stop DIR``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo")
INSTALL = "apt-get install -y slurm-wlm munge"
PARTITION = "debug"
START_TIMEOUT = 20.0


def unavailable_reason() -> str | None:
    """Why no cluster can be started here (None when one can): a test skips with this."""
    missing = [name for name in BINARIES if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing): as root, `{INSTALL}` (.ci/run does this)"
    if os.geteuid() != 0:
        return "the test cluster's slurmd must run as root (it starts jobs as their users); run the tests as root"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlurmCluster:
    """One node, one partition (``debug``, the default), ``gpus`` fake GPUs; :meth:`start`, :meth:`stop`."""

    def __init__(self, root: Path, gpus: int = 2, memory_mb: int = 16000, min_job_age: int = 3600) -> None:
        self.root = Path(root).resolve()
        self.node = socket.gethostname().split(".")[0]
        self.cpus = len(os.sched_getaffinity(0))
        self.gpus = gpus
        self.memory_mb = memory_mb
        self.min_job_age = min_job_age  # seconds a finished job stays visible to squeue/scontrol (no accounting here)
        self.conf = self.root / "slurm.conf"
        self._processes: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to use this cluster (added to os.environ by :meth:`start`)."""
        return {"SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        for name in ("munge", "state", "spool", "log"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o755)  # munged: its socket's folder must be searchable by every job's user
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        lines = {
            "ClusterName": "medidefics",
            "SlurmctldHost": self.node,
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "SlurmctldPort": _free_port(),
            "SlurmdPort": _free_port(),
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.root / 'munge' / 'munge.socket'}",
            "StateSaveLocation": self.root / "state",
            "SlurmdSpoolDir": self.root / "spool",
            "SlurmctldPidFile": self.root / "slurmctld.pid",
            "SlurmdPidFile": self.root / "slurmd.pid",
            "SlurmctldLogFile": self.root / "log" / "slurmctld.log",
            "SlurmdLogFile": self.root / "log" / "slurmd.log",
            # a job's processes are its batch shell's process group, as a production cluster's cgroup holds them all:
            # linuxproc follows parent links, and loses a training whose DVC died of Slurm's SIGTERM (it then outlives
            # its job, unkilled, and a test cannot see what the cluster's SIGKILL would have cut short)
            "ProctrackType": "proctrack/pgid",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            "SchedulerType": "sched/backfill",
            "AccountingStorageType": "accounting_storage/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "JobCompType": "jobcomp/none",
            "MpiDefault": "none",
            "ReturnToService": 2,
            "MinJobAge": self.min_job_age,
            "KillWait": 5,  # seconds between a cancel's SIGTERM and its SIGKILL (Slurm's default: 30)
            "InactiveLimit": 0,
            "GresTypes": "gpu",
            "SchedulerParameters": "defer_batch=0",
        }
        text = "".join(f"{key}={value}\n" for key, value in lines.items())
        text += f"NodeName={self.node} CPUs={self.cpus} RealMemory={self.memory_mb}{gres} State=UNKNOWN\n"
        text += f"PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP\n"
        self.conf.write_text(text)
        # Slurm drops a GPU without a device file: empty files stand in for /dev/nvidia<N>
        devices = self.root / "dev"
        devices.mkdir(exist_ok=True)
        for i in range(self.gpus):
            (devices / f"gpu{i}").touch()
        files = f"File={devices}/gpu[0-{self.gpus - 1}]" if self.gpus > 1 else f"File={devices}/gpu0"
        gres_conf = f"AutoDetect=off\nNodeName={self.node} Name=gpu {files}\n" if self.gpus else ""
        (self.root / "gres.conf").write_text(gres_conf)

    def start(self) -> SlurmCluster:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self.write_config()
        try:
            self._start_daemons()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_daemons(self) -> None:
        munge = self.root / "munge"
        self._spawn(
            "munged",
            [
                _binary("munged"), "--foreground", "--force",
                f"--socket={munge / 'munge.socket'}", f"--key-file={munge / 'munge.key'}",
                f"--pid-file={munge / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
        )  # fmt: skip
        self._wait_for(lambda: (munge / "munge.socket").exists(), "munged's socket")
        self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_binary("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        os.environ.update(self.env)
        self._wait_for(self._node_idle, f"node {self.node} idle in `sinfo`")

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 — the daemon keeps it
        self._processes[name] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, start_new_session=True
        )

    def _wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for name, process in self._processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited ({process.returncode}) while waiting for {what}: {self.logs()}")
            if condition():
                return
            time.sleep(0.3)
        raise RuntimeError(f"the test cluster did not come up ({what}) within {START_TIMEOUT:.0f} s: {self.logs()}")

    def _node_idle(self) -> bool:
        done = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env={**os.environ, **self.env}
        )
        return done.returncode == 0 and done.stdout.strip() in {"idle", "mixed", "allocated"}

    def logs(self, lines: int = 15) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"\n--- {log} ---\n" + "\n".join(tail))
        return "".join(parts)

    def cancel_all(self) -> None:
        """Cancel every job of the cluster (between tests), and wait until none is left running."""
        env = {**os.environ, **self.env}
        subprocess.run(["scancel", "--full", "--partition", PARTITION], env=env, capture_output=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            queue = subprocess.run(["squeue", "-h", "-t", "PD,R,CG,CF,S"], env=env, capture_output=True, text=True)
            if not queue.stdout.strip():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the daemons (their jobs end with slurmd), and take ``$SLURM_CONF`` out of the environment."""
        with contextlib.suppress(Exception):
            self.cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            process = self._processes.pop(name, None)
            if process is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if os.environ.get("SLURM_CONF") == str(self.conf):
            del os.environ["SLURM_CONF"]

    def save_pids(self) -> None:
        """For the command line: the daemons' process groups, so that ``stop`` from another process can end them."""
        (self.root / "daemons.json").write_text(json.dumps({n: p.pid for n, p in self._processes.items()}))


def stop_saved(root: Path) -> None:
    pids = json.loads((Path(root) / "daemons.json").read_text())
    for name in ("slurmd", "slurmctld", "munged"):
        with contextlib.suppress(ProcessLookupError, KeyError):
            os.killpg(pids[name], signal.SIGTERM)


if __name__ == "__main__":
    action, folder = sys.argv[1], Path(sys.argv[2])
    if action == "start":
        cluster = SlurmCluster(folder).start()
        cluster.save_pids()
        print(f"export SLURM_CONF={cluster.conf}")
    elif action == "stop":
        stop_saved(folder)
    else:
        sys.exit("usage: python tests/slurm_cluster.py start|stop DIR")
