"""MLflow tracking for every stage: where the store is, one run per stage invocation, honest run statuses.

Tracking URI precedence: params ``mlflow.tracking_uri`` (explicit, e.g. ``--set mlflow.tracking_uri=...``) >
``$MLFLOW_TRACKING_URI`` > ``sqlite:///mlflow.db``; a relative sqlite path is the repository root's (``$DVC_ROOT``
under DVC), never the cwd's. In a DVC experiment's temporary copy (a queued or ``--temp`` experiment) the environment
is whoever started the queue's, so only a store pinned in params counts; without one the stage refuses to start.
For a sqlite store the experiment's artifacts live beside the database (``<db folder>/mlartifacts``); both paths are
git-ignored.

:func:`tracked_run` logs the resolved config (params and ``config.yaml``) and provenance tags, never secrets, and ends
the run FINISHED, FAILED (tag ``error``) or KILLED (Ctrl-C, SIGTERM, a preemption: :mod:`.preemption`). After a
failure its calls to the store are bounded and cannot hide the failure (:func:`bounded_requests`); it can
also reopen a run (``resume_run_id``) to finish logging what a server outage kept from it. The experiment is tagged
as model training (:data:`EXPERIMENT_KIND`), not GenAI; a run's datasets are logged as MLflow inputs
(:func:`log_split_inputs`). A SIGKILLed or crashed process cannot end its run; the next :func:`tracked_run` on the
same host finds it (RUNNING, its pid gone) and marks it KILLED. Only the main process (rank 0 under
torchrun/accelerate) logs; other ranks get ``None``.
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

from med_idefics.config import ConfigError, Params
from med_idefics.tracking.preemption import Preempted
from med_idefics.tracking.provenance import experiment_copy, provenance_tags, redact, scrub_secrets, store_root

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
    "resolve_tracking_uri",
    "scrub_secrets",
    "search_all_runs",
    "seeded_run_name",
    "setup_tracking",
    "sqlite_file",
    "tracked_run",
    "ui_hint",
    "variant_color",
]

DB_FILE = "mlflow.db"
SQLITE = "sqlite:///"
DEFAULT_URI = f"{SQLITE}{DB_FILE}"  # relative: the repository root's (anchored by resolve_tracking_uri)
ARTIFACTS_DIR = "mlartifacts"
MAX_PARAM_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_LENGTH = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
_TRUNCATED = "...[truncated]"
# What `mlflow run` tags its project run with (source, entry point, git): copied onto a stage run taking its place.
PROJECT_TAGS = ("mlflow.source.", "mlflow.project.", "mlflow.gitRepoURL", "mlflow.user")
RUN_ID_VAR = "MLFLOW_RUN_ID"
# MLflow 3's tag for what an experiment is (set by its UI when a user picks the type; read by its assistant). The 3.17
# UI itself picks pages by its sidebar's GenAI / Model training switch, not by this tag (docs/compare.md).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
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


def resolve_tracking_uri(params: Params) -> str:
    """The store this process logs to (see the module docstring); a relative sqlite path is anchored at the
    repository root. In a DVC experiment's temporary copy only a store pinned in params is used, else ConfigError."""
    uri = params.mlflow.tracking_uri
    real_repo = experiment_copy()
    if real_repo is not None and not uri:
        would = anchor_sqlite(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI, real_repo)
        shown = DEFAULT_URI if would == anchor_sqlite(DEFAULT_URI, real_repo) else would
        raise ConfigError(
            f"this stage runs in a DVC experiment's temporary copy (dvc exp run --queue or --temp; the repository is "
            f"{real_repo}), where the environment is that of whoever started it (`dvc queue start`), not the one the "
            "experiment was queued in, so $MLFLOW_TRACKING_URI cannot say where its runs belong. Pin the store in the "
            f"experiment's params when queuing it: `dvc exp run --queue -S mlflow.tracking_uri={shown} …` "
            f"(the store this process would have used; `med-idefics tracking-uri` prints the current one)"
        )
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    return anchor_sqlite(uri, real_repo or store_root())


def anchor_sqlite(uri: str, root: Path) -> str:
    """``sqlite:///<relative path>`` → ``sqlite:///<root>/<relative path>``; any other URI unchanged (an absolute
    path is ``sqlite:////…``)."""
    if not uri.startswith(SQLITE):
        return uri
    path, sep, query = uri.removeprefix(SQLITE).partition("?")
    if not path or path == ":memory:" or Path(path).is_absolute():
        return uri
    return f"{SQLITE}{Path(root).resolve() / path}{sep}{query}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a file-backed sqlite store; None for anything else (a server, in-memory sqlite)."""
    if not uri.startswith(SQLITE):
        return None
    db_path = uri.removeprefix(SQLITE).split("?", 1)[0]
    return None if not db_path or db_path == ":memory:" else Path(db_path)


def ui_hint(uri: str) -> str:
    """How to look at the store ``uri``: a server's own page, else the command that serves a UI on it."""
    if uri.startswith(("http://", "https://")):
        return f"{uri} (the tracking server's UI)"
    return f"mlflow ui --backend-store-uri {uri}"


def _artifact_location(uri: str) -> str | None:
    """``<db folder>/mlartifacts`` for a file-backed sqlite store; None (the server decides) for anything else."""
    db_path = sqlite_file(uri)
    return None if db_path is None else str(db_path.resolve().parent / ARTIFACTS_DIR)


@contextlib.contextmanager
def _quiet_store_setup() -> Iterator[None]:
    """Creating a sqlite store runs alembic migrations that log a dozen INFO lines; keep them out of stage output."""
    loggers = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def setup_tracking(params: Params) -> str:
    """Point MLflow at the store and return the id of experiment ``mlflow.experiment``, creating it if needed."""
    import mlflow

    uri = resolve_tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    return ensure_experiment(params.mlflow.experiment, uri)


def ensure_experiment(name: str, uri: str) -> str:
    """The id of experiment ``name`` in the current store (``uri``), created (artifacts beside a sqlite store,
    tagged as model training) when missing; a deleted one is a ConfigError saying how to restore it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    kind = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    with _quiet_store_setup():
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            try:
                return mlflow.create_experiment(name, artifact_location=_artifact_location(uri), tags=kind)
            except MlflowException:  # another process created it in between
                experiment = mlflow.get_experiment_by_name(name)
                if experiment is None:
                    raise
    if experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"mlflow.experiment {name!r} is deleted in {uri}; restore it "
            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or set mlflow.experiment "
            "to a new name"
        )
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # an experiment made before, or by someone else
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


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


@contextlib.contextmanager
def bounded_requests(retries: int = 1, timeout_s: int = 10) -> Iterator[None]:
    """Inside the block, an MLflow HTTP request gives up after ``retries`` retries of at most ``timeout_s`` seconds
    each (lower settings of the user's stay), and the HTTP library's warning for each retry is left out."""
    bounds = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": retries, "MLFLOW_HTTP_REQUEST_TIMEOUT": timeout_s}
    saved = {name: os.environ.get(name) for name in bounds}
    for name, bound in bounds.items():
        current = saved[name]
        os.environ[name] = str(min(int(current), bound) if current and current.isdigit() else bound)
    try:
        with quiet_retries(threading.current_thread().name):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _OneThread(logging.Filter):
    def __init__(self, thread_name: str) -> None:
        super().__init__()
        self.thread_name = thread_name

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != self.thread_name


@contextlib.contextmanager
def quiet_retries(thread_name: str) -> Iterator[None]:
    """Leave out the HTTP library's warning for each retry of a request made by thread ``thread_name``: who makes
    the requests warns once per outage itself (:class:`~.outbox.MetricSender`)."""
    quiet, retries = _OneThread(thread_name), logging.getLogger("urllib3.connectionpool")
    retries.addFilter(quiet)
    try:
        yield
    finally:
        retries.removeFilter(quiet)


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
