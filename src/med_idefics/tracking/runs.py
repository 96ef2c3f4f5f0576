"""MLflow tracking for every stage: one run per stage invocation, honest run statuses.

:func:`tracked_run` logs the resolved config (params and ``config.yaml``) and provenance tags, never secrets, and ends
the run FINISHED, FAILED (tag ``error``) or KILLED (Ctrl-C, SIGTERM, a preemption: :mod:`.preemption`), in the store
and experiment :mod:`.store` names. After a failure its calls to the store are bounded and cannot hide the failure
(:func:`~.store.bounded_requests`); it can also reopen a run (``resume_run_id``) to finish logging what a server
outage kept from it. A run's datasets are logged as MLflow inputs (:func:`log_split_inputs`). A SIGKILLed or crashed
process cannot end its run; the next :func:`tracked_run` on the same host finds it (RUNNING, its pid gone) and marks
it KILLED. Only the main process (rank 0 under torchrun/accelerate) logs; other ranks get ``None``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from med_idefics.config import Params
from med_idefics.tracking.preemption import Preempted
from med_idefics.tracking.provenance import provenance_tags, redact, scrub_secrets
from med_idefics.tracking.store import bounded_requests, setup_tracking

if TYPE_CHECKING:
    from mlflow import ActiveRun

logger = logging.getLogger(__name__)
__all__ = [
    "RunTerminated",
    "end_stale_runs",
    "is_main_process",
    "log_metrics_to",
    "log_params",
    "log_split_inputs",
    "param_strings",
    "scrub_secrets",
    "search_all_runs",
    "seeded_run_name",
    "tracked_run",
    "variant_color",
]

MAX_PARAM_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_LENGTH = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
_TRUNCATED = "...[truncated]"
# What `mlflow run` tags its project run with (source, entry point, git): copied onto a stage run taking its place.
PROJECT_TAGS = ("mlflow.source.", "mlflow.project.", "mlflow.gitRepoURL", "mlflow.user")
RUN_ID_VAR = "MLFLOW_RUN_ID"
# The colour MLflow 3's UI draws a run in (table dot, chart bars and lines; what its colour picker writes). A variant's
# runs get the variant's colour — Figure 2's for the paper's three — so a bar names its variant whatever the seed;
# MLflow's own colours come from the run id and repeat across variants.
RUN_COLOR_TAG = "mlflow.runColor"
VARIANT_COLORS = {"base": "#1f77b4", "single-stage": "#ff7f0e", "two-stage": "#2ca02c"}  # matplotlib C0, C1, C2
OTHER_COLORS = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


class RunTerminated(SystemExit):
    """Raised by :func:`sigterm_raises` (a tracked run, ``med-idefics repro``); exits with the shell's status for
    SIGTERM (143)."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def is_main_process() -> bool:
    """True unless torchrun/accelerate say this is another rank (``RANK``, else ``LOCAL_RANK``, is not 0)."""
    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK")
    return rank is None or int(rank) == 0


def variant_color(variant: str) -> str:
    """The run colour of a variant: :data:`VARIANT_COLORS`, else one of :data:`OTHER_COLORS` by a stable hash."""
    import zlib

    return VARIANT_COLORS.get(variant) or OTHER_COLORS[zlib.crc32(variant.encode()) % len(OTHER_COLORS)]


def seeded_run_name(variant: str, seed: int) -> str:
    """The name of the run that makes a variant (its training, or the base's build): the variant and the training
    seed, so that two seeds' rows in the runs table, and their bars in the chart view (whose legend shows run names),
    can be told apart."""
    return f"{variant} (seed {seed})"


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - len(_TRUNCATED)] + _TRUNCATED


def param_strings(mapping: Mapping[str, Any]) -> dict[str, str]:
    """``mapping`` as MLflow stores it as params: secrets dropped, values stringified and cut to 6000 characters."""
    return {str(k): _truncate(str(v), MAX_PARAM_LENGTH) for k, v in scrub_secrets(mapping).items()}


def log_params(mapping: Mapping[str, Any], run_id: str | None = None) -> dict[str, str]:
    """Log ``mapping`` as MLflow params (:func:`param_strings`). Returns what was logged."""
    import mlflow

    logged = param_strings(mapping)
    mlflow.log_params(logged, run_id=run_id)
    return logged


def log_metrics_to(run_id: str, metrics: Mapping[str, float]) -> None:
    """Log ``metrics`` (step 0) onto run ``run_id``, active or not, in one batch: how an evaluation puts its headline
    numbers on the training run it evaluates, which has finished by then."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()])


def log_split_inputs(root: str | Path, splits: Iterable[tuple[str, str]], context: str) -> None:
    """Log each (dataset, split) of ``root`` as an input of the active run: name ``<dataset>/<split>``, digest the
    md5 of its file (what DVC records for it in ``data.dvc``'s listing), source the file, ``split`` and ``dataset`` as
    input tags; ``context`` is training, validation or evaluation. Logging the same split twice is harmless."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource  # registered by mlflow.data at import

    from med_idefics.data.schema import split_path
    from med_idefics.files import file_md5

    for dataset, split in dict.fromkeys(splits):
        path = split_path(root, dataset, split)
        source = LocalArtifactDatasetSource(str(path))
        data = MetaDataset(source=source, name=f"{dataset}/{split}", digest=file_md5(path))
        mlflow.log_input(data, context=context, tags={"dataset": dataset, "split": split})


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a dead child its parent has not reaped yet still answers signal 0
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def end_stale_runs(experiment_id: str, detected_by: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process is gone (SIGKILL, OOM killer, crash); return their ids.
    Runs recorded on other hosts are left alone: their pids mean nothing here."""
    from mlflow import MlflowClient

    client = MlflowClient()
    query = f"attributes.status = 'RUNNING' and tags.host = '{socket.gethostname()}'"
    reason = f"sigkill-or-crash, detected by {f'run {detected_by}' if detected_by else 'end_stale_runs'}"
    ended = []
    for run in search_all_runs(client, experiment_id, query):
        pid = run.data.tags.get("pid", "")
        if pid.isdigit() and not _is_alive(int(pid)):
            client.set_tag(run.info.run_id, "killed_by", reason)
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended


def search_all_runs(client, experiment_id: str, query: str, order_by: list[str] | None = None) -> list:
    """Every run of ``experiment_id`` matching ``query``, all pages of MLflow's search."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, order_by=order_by, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside the block, SIGTERM (``kill``, a scheduler's preemption) raises :class:`RunTerminated`, so that the
    code around it can clean up (end the MLflow run, stop the stages it started)."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        yield
        return

    def handler(signum, frame):
        raise RunTerminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def tracked_run(
    params: Params,
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    nested: bool = False,
    parent_run_id: str | None = None,
    dvc_stage: str | None = None,
    catch_sigterm: bool = True,
    resume_run_id: str | None = None,
) -> Iterator[ActiveRun | None]:
    """An MLflow run for one stage invocation, yielding the ``ActiveRun`` (``None`` on non-main ranks).

    ``tags`` are added over the provenance tags (git commit, data md5, DVC stage/experiment, profile, host, pid);
    ``dvc_stage`` defaults to ``$DVC_STAGE``, which DVC sets for every stage command. ``catch_sigterm=False``: the
    caller handles SIGTERM itself (a training stage: :mod:`.preemption`). ``resume_run_id``: reopen that run (its
    params and tags stay; see :func:`_reopen`) instead of starting one.
    """
    if not is_main_process():
        yield None
        return
    import mlflow

    experiment_id = setup_tracking(params)
    client = mlflow.MlflowClient()
    project_run = _project_run_elsewhere(client, experiment_id)
    all_tags = {**provenance_tags(params.profile, dvc_stage), **{k: str(v) for k, v in (tags or {}).items()}}
    if project_run is not None:
        all_tags |= _project_source_tags(project_run)
    if all_tags.get("variant"):
        all_tags.setdefault(RUN_COLOR_TAG, variant_color(all_tags["variant"]))
    all_tags = {k: _truncate(v, MAX_TAG_LENGTH) for k, v in scrub_secrets(all_tags).items()}
    reopened = resume_run_id is not None and _reopen(client, experiment_id, resume_run_id, all_tags)
    run = mlflow.start_run(
        run_id=resume_run_id if reopened else None,
        experiment_id=None if reopened else experiment_id,
        run_name=None if reopened else run_name,
        nested=nested,
        parent_run_id=None if reopened else parent_run_id,
        tags=None if reopened else all_tags,
    )
    run_id = run.info.run_id
    status = "FAILED"
    try:
        with sigterm_raises() if catch_sigterm else contextlib.nullcontext():
            if not reopened:
                log_params(params.flat(), run_id)
                if all_tags.get("variant"):  # a param too: the compare page's "show diff only" lists params, not tags
                    log_params({"variant": all_tags["variant"]}, run_id)
                mlflow.log_dict(scrub_secrets(params.to_dict()), "config.yaml", run_id=run_id)
            end_stale_runs(experiment_id, detected_by=run_id)
            yield run
        status = "FINISHED"
    except Preempted:  # the training tagged the run itself (why, step, checkpoint), or kept the tags for its rerun
        status = "KILLED"
        raise
    except (KeyboardInterrupt, RunTerminated) as err:
        killed_by = "SIGTERM" if isinstance(err, RunTerminated) else "KeyboardInterrupt"
        _quietly(client.set_tag, run_id, "killed_by", killed_by)
        status = "KILLED"
        raise
    except SystemExit as err:
        status = "FINISHED" if err.code in (None, 0) else "FAILED"
        if status == "FAILED":
            _quietly(client.set_tag, run_id, "error", _truncate(redact(f"SystemExit: {err.code}"), MAX_TAG_LENGTH))
        raise
    except BaseException as err:
        _quietly(client.set_tag, run_id, "error", _truncate(redact(f"{type(err).__name__}: {err}"), MAX_TAG_LENGTH))
        raise
    finally:
        if status == "FINISHED":
            mlflow.end_run(status)
        else:  # a failure is on its way out: the store may be what failed, and must not hide it or hold it
            _quietly(mlflow.end_run, status)
        if project_run is not None:
            _quietly(_point_to, client, project_run, f"{params.mlflow.experiment}/{run_id}")


def _quietly(call, *args) -> None:
    """A call to the store made while a failure is on its way out: bounded, and a failure of its own only warned
    about (the run then stays as the store has it; the next run of this host ends it: :func:`end_stale_runs`)."""
    try:
        with bounded_requests():
            call(*args)
    except Exception as err:
        why = redact(str(err).splitlines()[0][:300])
        logger.warning("the tracking store did not answer %s: %s", call.__name__, why)


def _reopen(client, experiment_id: str, run_id: str, tags: Mapping[str, str]) -> bool:
    """Prepare run ``run_id`` to be reopened by this process: True when it is in this experiment (not deleted); its
    host and pid become this process's, and the marks of its earlier end (``killed_by``, ``error``) go. False, with
    a warning, when it is not there: the caller starts a new run instead."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
        uri = redact(mlflow.get_tracking_uri())
        logger.warning("run %s is not in this experiment of %s: logging into a new run", run_id, uri)
        return False
    for key in ("host", "pid"):
        client.set_tag(run_id, key, tags[key])
    for key in ("killed_by", "error"):
        if key in run.data.tags:
            client.delete_tag(run_id, key)
    return True


def _project_run_elsewhere(client, experiment_id: str):
    """The run ``mlflow run`` opened for this entry point (``$MLFLOW_RUN_ID``) when it is not in ``experiment_id``
    (``mlflow run /path`` from outside the checkout: Default, see :mod:`med_idefics.tracking.mlflow_project`). A run
    cannot change experiment: the variable is taken out of the environment, so that ``mlflow.start_run`` opens a run of
    the stage's own instead of adopting that one. None when there is none, or it is to be adopted."""
    from mlflow.exceptions import MlflowException

    run_id = os.environ.get(RUN_ID_VAR)
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:  # in another store: `mlflow run` ends it; the stage logs where its params say
        del os.environ[RUN_ID_VAR]
        return None
    if run.info.experiment_id == experiment_id:
        return None
    del os.environ[RUN_ID_VAR]
    return run


def _project_source_tags(project_run) -> dict[str, str]:
    tags = {k: v for k, v in project_run.data.tags.items() if k.startswith(PROJECT_TAGS)}
    return tags | {"mlflow_project_run_id": project_run.info.run_id}


def _point_to(client, project_run, moved_to: str) -> None:
    """Tag the project run with where its stage logged (``<experiment>/<run id>``); `mlflow run` ends it."""
    client.set_tag(project_run.info.run_id, "moved_to", moved_to)
    note = f"This `mlflow run` logged in experiment {moved_to}; pass --experiment-name to open it there directly."
    client.set_tag(project_run.info.run_id, "mlflow.note.content", note)
