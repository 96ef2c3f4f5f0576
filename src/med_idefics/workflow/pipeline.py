"""``med-idefics repro --jobs N``: the DVC pipeline with up to N independent stages running at once.

``dvc repro`` runs one stage at a time; on the demo's 2 CPU cores the stage-2 trainings, the sweep and the
evaluations then wait for each other although none reads what another writes. Here every stage of ``dvc.yaml`` still
runs through DVC — ``dvc --wait-for-lock repro --single-item <stage>`` decides whether it is up to date, runs its
command, records it in ``dvc.lock`` and caches its outputs — and this module only chooses when: a stage starts once
every stage it depends on (DVC's own graph) has finished, the one with the longest chain of stages after it first.
DVC releases its repository lock while a stage's command runs and holds read/write locks on that stage's deps and
outs, so stages without a path in common run side by side; the MLflow store (SQLite) serialises their writes.

On a GPU machine each running stage sees one GPU of its own (``CUDA_VISIBLE_DEVICES``; without it every stage would
train on cuda:0 while the other GPUs idle), and no more stages run at once than there are GPUs.

Each stage's output goes to ``<log_dir>/<stage>.log``; the console gets a line when a stage starts or ends and, while
stages run, their latest progress line. A failed stage stops new starts, lets the running ones finish and prints the
end of its log. Last, a plain ``dvc repro`` confirms that the pipeline is up to date (and runs whatever is not).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from med_idefics.tracking.runs import sigterm_raises

LOG_DIR = Path("outputs/logs")
PROGRESS_EVERY = 30.0  # seconds between progress lines while stages run
TAIL_LINES = 30  # lines of a failed stage's log shown on the console
UP_TO_DATE = "didn't change, skipping"  # what `dvc repro` says of a stage it need not run


class PipelineError(RuntimeError):
    """A stage failed (its log says why) or the pipeline cannot be read."""


def stage_graph(repo_root: str | Path = ".") -> dict[str, list[str]]:
    """``dvc.yaml``'s stages in file order, each with the stages it depends on (data sources such as ``data.dvc`` are
    not stages to run: the stages that read them check them)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(repo_root)) as repo:
            graph = repo.index.graph
            stages = [s for s in repo.index.stages if not s.is_data_source]
            names = {s: s.addressing for s in stages}
            return {names[s]: [names[d] for d in graph.successors(s) if d in names] for s in stages}
    except DvcException as err:
        raise PipelineError(f"cannot read the DVC pipeline in {repo_root}: {err}") from err


def chain_lengths(graph: dict[str, list[str]]) -> dict[str, int]:
    """Per stage, the number of stages on the longest path from it to the end of the pipeline (itself included):
    the critical path first, so that the last stages do not wait for a long chain started late."""
    dependents: dict[str, list[str]] = {name: [] for name in graph}
    for name, deps in graph.items():
        for dep in deps:
            dependents[dep].append(name)
    lengths: dict[str, int] = {}

    def length(name: str) -> int:
        if name not in lengths:
            lengths[name] = 1 + max((length(d) for d in dependents[name]), default=0)
        return lengths[name]

    for name in graph:
        length(name)
    return lengths


@dataclass
class _Running:
    process: subprocess.Popen
    log: Path
    gpu: str | None = None  # the GPU it sees (CUDA_VISIBLE_DEVICES), None off a GPU machine
    started: float = field(default_factory=time.monotonic)


def repro(jobs: int, log_dir: Path = LOG_DIR, echo: Callable[[str], None] = print) -> None:
    """``med-idefics repro``: this repository's pipeline, up to ``jobs`` stages at once, each on a GPU of its own
    where there are GPUs. With more than one stage at once, the MLflow store (and the experiment) the stages share is
    set up first, so that two stages starting together never race to create its tables."""
    warning = oversubscription(jobs, int(os.environ.get("OMP_NUM_THREADS") or 1), len(os.sched_getaffinity(0)))
    if warning:
        echo(f"warning: {warning}")
    gpus = None
    if jobs > 1:
        setup_tracking_for_parallel_stages()
        gpus = visible_gpus()
    run_pipeline(jobs, log_dir, echo=echo, gpus=gpus)


def setup_tracking_for_parallel_stages() -> None:
    from med_idefics.config import load_params
    from med_idefics.tracking.store import setup_tracking

    setup_tracking(load_params())


def visible_gpus() -> list[str]:
    """The GPUs this process may hand to stages: those ``CUDA_VISIBLE_DEVICES`` lists, else every GPU torch sees."""
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip() and gpu.strip() != "-1"]
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def oversubscription(jobs: int, threads: int, cores: int) -> str | None:
    """Why ``jobs`` stages of ``threads`` torch threads each are too many for ``cores`` (None when they are not):
    OpenMP threads spin while they wait, so two 2-thread stages on 2 cores trained ~45x slower than one thread each."""
    if jobs <= 1 or jobs * threads <= cores:
        return None
    return (
        f"{jobs} stages at once with OMP_NUM_THREADS={threads} is {jobs * threads} threads on {cores} cores; they "
        f"will wait on each other, far slower than --jobs {max(1, cores // threads)}"
    )


def run_pipeline(
    jobs: int,
    log_dir: Path = LOG_DIR,
    graph: dict[str, list[str]] | None = None,
    dvc: tuple[str, ...] = ("dvc",),
    echo: Callable[[str], None] = print,
    gpus: list[str] | None = None,
) -> None:
    """Run every stage of ``graph`` (default: this repository's ``dvc.yaml``), up to ``jobs`` at once, then
    ``dvc repro``. With ``gpus``, each running stage sees one of them alone and at most ``len(gpus)`` run at once.
    Raises :class:`PipelineError` when a stage fails."""
    if jobs < 1:
        raise PipelineError(f"--jobs must be at least 1, got {jobs}")
    if gpus and jobs > len(gpus):
        echo(f"{len(gpus)} GPUs: {len(gpus)} stages at a time, each on a GPU of its own (--jobs {jobs} asked for more)")
        jobs = len(gpus)
    graph = stage_graph() if graph is None else graph
    dangling = sorted({dep for deps in graph.values() for dep in deps if dep not in graph})
    if dangling:
        raise PipelineError(f"stages depend on {dangling}, which are not stages of the pipeline")
    order = {name: i for i, name in enumerate(graph)}
    priority = chain_lengths(graph)
    log_dir.mkdir(parents=True, exist_ok=True)
    waiting, done, failed = set(graph), set(), []
    running: dict[str, _Running] = {}
    started = last_progress = time.monotonic()
    with sigterm_raises():  # SIGTERM unwinds like a Ctrl-C, through the `except` below
        try:
            while waiting or running:
                for name, ok in _reap(running, f"[{clock(started)}]", echo):
                    if ok:
                        done.add(name)
                    else:
                        failed.append(name)
                ready = [n for n in waiting if all(d in done for d in graph[n])] if not failed else []
                for name in sorted(ready, key=lambda n: (-priority[n], order[n]))[: jobs - len(running)]:
                    waiting.discard(name)
                    gpu = next((g for g in gpus if g not in {j.gpu for j in running.values()}), None) if gpus else None
                    running[name] = _start(name, log_dir, dvc, gpu)
                    on = f", GPU {gpu}" if gpu is not None else ""
                    echo(f"[{clock(started)}] start {name} (log: {running[name].log}{on})")
                if failed and not running:
                    break
                if running and time.monotonic() - last_progress >= PROGRESS_EVERY:
                    last_progress = time.monotonic()
                    for name, job in running.items():
                        echo(f"[{clock(started)}]   {name}: {last_line(job.log)}")
                time.sleep(0.2)
        except BaseException:  # Ctrl-C, SIGTERM, or a bug here: the stages must not run on unattended
            if running:
                echo(f"[{clock(started)}] stopping {', '.join(running)}")
            _stop(running)
            raise
    if failed:
        raise PipelineError(
            f"stage {failed[0]} failed (log: {log_dir / (failed[0] + '.log')}); the stages after it did not run"
        )
    echo(f"[{clock(started)}] all {len(graph)} stages done; checking with `dvc repro`")
    if subprocess.run([*dvc, "repro"]).returncode != 0:
        raise PipelineError("`dvc repro` failed after the stages ran (its output is above)")


def _reap(running: dict[str, _Running], clock: str, echo: Callable[[str], None]) -> list[tuple[str, bool]]:
    """Take the stages that ended out of ``running`` and report each: (name, succeeded) per stage."""
    ended = []
    for name, job in list(running.items()):
        code = job.process.poll()
        if code is None:
            continue
        del running[name]
        seconds = time.monotonic() - job.started
        if code == 0:
            note = " (up to date)" if UP_TO_DATE in job.log.read_text(errors="replace") else ""
            echo(f"{clock} done {name} in {seconds:.0f} s{note}")
        else:
            echo(f"{clock} FAILED {name} (exit {code}, {seconds:.0f} s); the end of {job.log}:")
            echo(log_tail(job.log))
        ended.append((name, code == 0))
    return ended


def _start(name: str, log_dir: Path, dvc: tuple[str, ...], gpu: str | None = None) -> _Running:
    log = log_dir / f"{name}.log"
    env = None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
    with open(log, "wb") as handle:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [*dvc, "--wait-for-lock", "repro", "--single-item", name],
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group: a Ctrl-C is forwarded by _stop, to the whole stage
            preexec_fn=_interruptible,
        )
    return _Running(process, log, gpu)


def _stop(running: dict[str, _Running]) -> None:
    """Interrupt the running stages — SIGINT to each stage's process group, DVC and the stage command alike, as a
    Ctrl-C would: their MLflow runs end as KILLED, not RUNNING — and wait for them."""
    for job in running.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.process.pid, signal.SIGINT)
    for job in running.values():
        try:
            job.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(job.process.pid, signal.SIGKILL)
            job.process.wait()


def _interruptible() -> None:
    """In a stage's process, before DVC starts: SIGINT back to its default, which Python turns into KeyboardInterrupt —
    a runner started in the background (``… &``) has SIGINT ignored, and its children would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def clock(started: float) -> str:
    seconds = int(time.monotonic() - started)
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def last_line(log: Path, width: int = 100) -> str:
    """The latest line of a log, progress bars included (tqdm rewrites its line with carriage returns)."""
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, log.stat().st_size - 4096))
            text = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    lines = _lines(text)
    return lines[-1].strip()[:width] if lines else ""


def log_tail(log: Path, lines: int = TAIL_LINES) -> str:
    return "\n".join(_lines(log.read_text(encoding="utf-8", errors="replace"))[-lines:])


def _lines(text: str) -> list[str]:
    """A log's non-blank lines, each redraw of a progress bar (tqdm ends it with a carriage return) a line."""
    return [line for line in text.replace("\r", "\n").split("\n") if line.strip()]
