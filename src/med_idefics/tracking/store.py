"""The tracking store: which one this process logs to, its experiment, and how long a request to it may take.

Tracking URI precedence: params ``mlflow.tracking_uri`` (explicit, e.g. ``--set mlflow.tracking_uri=...``) >
``$MLFLOW_TRACKING_URI`` > ``sqlite:///mlflow.db``; a relative sqlite path is the repository root's (``$DVC_ROOT``
under DVC), never the cwd's. In a DVC experiment's temporary copy (a queued or ``--temp`` experiment) the environment
is whoever started the queue's, so only a store pinned in params counts; without one the stage refuses to start.
For a sqlite store the experiment's artifacts live beside the database (``<db folder>/mlartifacts``); both paths are
git-ignored. The experiment is tagged as model training (:data:`EXPERIMENT_KIND`), not GenAI. After a failure, calls
to the store are bounded (:func:`bounded_requests`) so that they cannot hide it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from med_idefics.config import ConfigError, Params
from med_idefics.tracking.provenance import experiment_copy, store_root

DB_FILE = "mlflow.db"
SQLITE = "sqlite:///"
DEFAULT_URI = f"{SQLITE}{DB_FILE}"  # relative: the repository root's (anchored by resolve_tracking_uri)
ARTIFACTS_DIR = "mlartifacts"
# MLflow 3's tag for what an experiment is (set by its UI when a user picks the type; read by its assistant). The 3.17
# UI itself picks pages by its sidebar's GenAI / Model training switch, not by this tag (docs/compare.md).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


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


@contextlib.contextmanager
def client_settings(variables: dict[str, str]) -> Iterator[None]:
    """Inside the block, the MLflow client's settings (its environment variables) are ``variables``; each is as
    before afterwards, unset where it was unset."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def bounded_requests(retries: int = 1, timeout_s: int = 10) -> Iterator[None]:
    """Inside the block, an MLflow HTTP request gives up after ``retries`` retries of at most ``timeout_s`` seconds
    each (lower settings of the user's stay), and the HTTP library's warning for each retry is left out."""
    bounds = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": retries, "MLFLOW_HTTP_REQUEST_TIMEOUT": timeout_s}
    settings = {}
    for name, bound in bounds.items():
        current = os.environ.get(name)
        settings[name] = str(min(int(current), bound) if current and current.isdigit() else bound)
    with client_settings(settings), quiet_retries(threading.current_thread().name):
        yield


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
