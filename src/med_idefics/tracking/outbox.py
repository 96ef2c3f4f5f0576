"""Logging that outlives a tracking-server outage: a team's MLflow server restarts, its network drops, while a stage
works for hours.

* :class:`MetricSender`: a training run's step metrics go to the server from a background thread, so that no step
  waits on it. While it does not answer they wait in memory, in order, and are retried every ``retry_s`` seconds —
  one warning when it stops answering, one when it answers again — and sent with their own steps and times when it
  returns. (MLflow's own asynchronous logging drops a batch whose request failed after the client's retries:
  ``mlflow.utils.async_logging``.) Sending again what the server stored but did not acknowledge is harmless: it
  keeps one row per (key, step, time, value).
* :class:`Outbox`: what a stage could still not send when it had to stop (step metrics, tags, a run's end), kept in a
  file beside its outputs; the stage's next invocation sends it first.
* :class:`TrackingUnavailable`: the error a stage ends with when its work is done but the server will not take it:
  it names where the work is kept and says to run the same command again.

How long one request may try is MLflow's own setting: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (default 7, minutes of
backoff) and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` (120 s). Calls made once something has already gone wrong (a run's end
after a failure, the tags of a preempted run) are bounded (:func:`med_idefics.tracking.store.bounded_requests`): a
scheduler's grace period is seconds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path

from med_idefics.files import write_json

logger = logging.getLogger(__name__)
OUTBOX_FILE = ".tracking-outbox.json"
MAX_BATCH = 1000  # metrics per log_batch request: the REST API's limit
MAX_PENDING = 200_000  # metrics held while the server is away: ~25,000 logging steps of 8 metrics (~50 MB)
# How long a stopping stage waits for the metrics in flight: a scheduler's grace period after SIGTERM is about 30 s
# (Slurm's KillWait default), and the checkpoint is saved by then.
CLOSE_WAIT_S = 15.0


class TrackingUnavailable(RuntimeError):
    """The tracking store did not take what a stage had to log; its work is kept on disk (the message says where)."""


class MetricSender:
    """Step metrics of run ``run_id``, sent in the background (see the module docstring). :meth:`log` never blocks
    on the server and never raises; :meth:`close` makes a last attempt and returns what could not be sent."""

    def __init__(self, run_id: str, retry_s: float = 10.0, max_pending: int = MAX_PENDING) -> None:
        from mlflow import MlflowClient

        self.run_id, self.retry_s, self.max_pending = run_id, retry_s, max_pending
        self._client = MlflowClient()
        self._pending: deque = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._last_step = 0
        self._down: tuple[float, int] | None = None  # (since, at step) while the server does not answer
        self.outages = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=f"mlflow-metrics-{run_id[:8]}", daemon=True)
        self._thread.start()

    @property
    def server_down(self) -> bool:
        return self._down is not None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._cond:
            self._last_step = step
            self._pending.extend(Metric(key, float(value), now, step) for key, value in metrics.items())
            overflow = len(self._pending) - self.max_pending
            if overflow > 0:
                for _ in range(overflow):
                    self._pending.popleft()
                if not self.dropped:
                    logger.warning(
                        "%d step metrics of run %s waited for the tracking server, more than the %d it holds: the "
                        "oldest are dropped (every step's losses stay in the run's trainer_log.json)",
                        len(self._pending) + overflow, self.run_id, self.max_pending,
                    )  # fmt: skip
                self.dropped += overflow
            self._cond.notify()

    def close(self, wait_s: float | None = None) -> list:
        """Send what waits (one more attempt if the server is away) and stop; the metrics not sent, oldest first.
        ``wait_s`` bounds the wait for the attempt in flight (None: as long as the client's retries take)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(wait_s)
        with self._cond:
            return list(self._pending)

    def _run(self) -> None:
        from med_idefics.tracking.store import quiet_retries

        with quiet_retries(threading.current_thread().name):
            self._send_while_open()

    def _send_while_open(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = [self._pending[i] for i in range(min(MAX_BATCH, len(self._pending)))]
            try:
                self._client.log_batch(self.run_id, metrics=batch)
            except Exception as err:  # whatever the client raises for an unreachable or failing server
                self._failed(err)
                with self._cond:
                    if self._closing:
                        return
                    self._cond.wait(self.retry_s)  # close() wakes it for a last attempt
                continue
            with self._cond:
                for _ in batch:
                    self._pending.popleft()
                back, waited = self._down is not None and not self._pending, len(batch)
            if back:
                since, step = self._down
                self._down = None
                logger.warning(
                    "the tracking server answers again after %.0f s: the step metrics logged since step %d are sent "
                    "(last batch: %d)", time.monotonic() - since, step, waited,
                )  # fmt: skip

    def _failed(self, err: Exception) -> None:
        if self._down is not None:
            return
        self._down = (time.monotonic(), self._last_step)
        self.outages += 1
        logger.warning(
            "the tracking server did not take run %s's step metrics at step %d (%s): training goes on; the step "
            "metrics wait here and are sent when it answers (tried every %.0f s)",
            self.run_id, self._last_step, first_line(err), self.retry_s,
        )  # fmt: skip


def first_line(err: BaseException) -> str:
    """An error's first line, for a warning or a message: cut at 300 characters, anything secret redacted (a URI's
    user:password, a token)."""
    from med_idefics.tracking.provenance import redact

    text = f"{type(err).__name__}: {err}"
    return redact(text.splitlines()[0][:300])


class Outbox:
    """What could not be sent to the tracking store for runs of one stage, in ``<folder>/.tracking-outbox.json``:
    per run, its step metrics (as logged: key, value, time, step), tags, and the status it ended with."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / OUTBOX_FILE

    def _read(self) -> dict:
        return json.loads(self.path.read_text())["runs"] if self.path.is_file() else {}

    def __bool__(self) -> bool:
        return bool(self._read())

    def keep(
        self, run_id: str, metrics: Iterable = (), tags: Mapping[str, str] | None = None, status: str | None = None
    ) -> None:
        runs = self._read()
        entry = runs.setdefault(run_id, {"metrics": [], "tags": {}, "status": None})
        entry["metrics"] += [[m.key, m.value, m.timestamp, m.step] for m in metrics]
        entry["tags"] |= dict(tags or {})
        entry["status"] = status or entry["status"]
        write_json(self.path, {"runs": runs})

    def send(self) -> list[str]:
        """Send everything kept, run by run, forgetting each run once sent; returns the runs sent. Raises what the
        client raises when the store does not answer (what was not sent stays kept). A run deleted from the store
        meanwhile is forgotten with a warning."""
        from mlflow import MlflowClient
        from mlflow.entities import Metric, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

        client, sent = MlflowClient(), []
        runs = self._read()
        for run_id, entry in list(runs.items()):
            metrics = [Metric(*row) for row in entry["metrics"]]
            tags = [RunTag(key, value) for key, value in entry["tags"].items()]
            try:
                for start in range(0, max(len(metrics), 1), MAX_BATCH):
                    client.log_batch(run_id, metrics=metrics[start : start + MAX_BATCH], tags=tags if not start else [])
                if entry["status"]:
                    client.set_terminated(run_id, entry["status"])
            except MlflowException as err:
                if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                    raise
                logger.warning("run %s is no longer in the tracking store: what it could not log is dropped", run_id)
            del runs[run_id]
            write_json(self.path, {"runs": runs})
            sent.append(run_id)
        if not runs:
            self.path.unlink(missing_ok=True)
        return sent


def keep_unsent(sender: MetricSender | None, outbox: Outbox, status: str | None = None, error=None) -> list:
    """Close a run's sender, waiting at most :data:`CLOSE_WAIT_S`; what it could not send goes to ``outbox`` — and
    when the server is away, the run's end as well (``status``, and the error of a FAILED one). Returns the unsent."""
    if sender is None:
        return []
    unsent = sender.close(wait_s=CLOSE_WAIT_S)
    if unsent or sender.server_down:
        failed = error is not None and status == "FAILED"
        tags = {"error": first_line(error)} if failed else {}
        outbox.keep(sender.run_id, unsent, tags, status=status if sender.server_down else None)
    return unsent


def end_preempted_run(preempted, sender: MetricSender, outbox: Outbox) -> None:
    """Tag the run of ``sender`` (closed here) with why, at which step and into
    which checkpoint it stopped; when the server is away, keep its metrics, tags and end (KILLED) in ``outbox`` for
    the rerun to send. Bounded: the scheduler's grace period is running. ``preempted``: a
    :class:`~med_idefics.tracking.preemption.Preempted`."""
    from med_idefics.tracking.store import bounded_requests

    unsent = keep_unsent(sender, outbox, status="KILLED")
    if not unsent and not sender.server_down:
        from mlflow import MlflowClient
        from mlflow.entities import RunTag

        try:
            with bounded_requests():
                MlflowClient().log_batch(sender.run_id, tags=[RunTag(k, v) for k, v in preempted.tags().items()])
            return
        except Exception as err:
            logger.warning("the tracking server did not take the tags of the preempted run: %s", err)
    outbox.keep(sender.run_id, tags=preempted.tags(), status="KILLED")
    logger.warning("the tracking server does not answer: run %s's end is kept in %s", sender.run_id, outbox.path)


def send_outbox(folder: str | Path, params) -> None:
    """Send what earlier invocations of a stage kept in ``folder``'s outbox, to the store of ``params``;
    :class:`TrackingUnavailable` when it does not answer."""
    from mlflow.exceptions import MlflowException

    from med_idefics.tracking.provenance import redact
    from med_idefics.tracking.store import resolve_tracking_uri, setup_tracking

    outbox = Outbox(folder)
    if not outbox:
        return
    try:
        setup_tracking(params)
        sent = outbox.send()
    except MlflowException as err:
        raise TrackingUnavailable(
            f"the tracking store {redact(resolve_tracking_uri(params))} does not answer ({first_line(err)}); "
            f"{outbox.path} holds what earlier runs of this stage could not log. Run the same command again when it "
            "answers"
        ) from err
    logger.warning("sent what run(s) %s could not log during a tracking outage (%s)", ", ".join(sent), outbox.path)
