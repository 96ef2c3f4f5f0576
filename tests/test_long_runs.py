"""Long runs (docs/long-runs.md): what preemption, a time limit, a save cut short, a tracking-server outage and a full
disk do to training and evaluation. The fast checks run in `make test`; the end-to-end ones, marked `long_runs` — a
real signal mid-training and the rerun, a real `mlflow server` stopped and started again, a small tmpfs filled — in
`make test-long-runs` (`.ci/run` calls it)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from safetensors.torch import load_file

from med_idefics.config import load_params
from med_idefics.files import DiskSpaceError
from med_idefics.modeling.checkpoints import MANIFEST, STAGING, check_free_space, publish, resume_point, scan
from med_idefics.reporting.results import read_run_info
from med_idefics.stages.train import TrainRequest, train
from med_idefics.tracking.outbox import MetricSender, Outbox, TrackingUnavailable, end_preempted_run
from med_idefics.tracking.preemption import EXIT_REQUEUE, Preempted, PreemptionRequest

BIN = Path(sys.executable).parent
STAGE = "single-stage"  # the tmp project's 24 VQA records at micro-batch 4: 6 optimizer steps an epoch
OUT = Path("outputs/ss")
CHECKPOINTS = OUT / "checkpoints"


def _recipe(**changes) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["single_stage"] |= changes
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _runs() -> list:
    experiment = mlflow.get_experiment_by_name("med-idefics")
    if experiment is None:
        return []
    return MlflowClient().search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def _history(run_id: str, key: str = "train_loss") -> dict[int, float]:
    """step → value of a run's metric; a step logged twice fails."""
    history = MlflowClient().get_metric_history(run_id, key)
    steps = sorted(m.step for m in history)
    assert len(steps) == len(set(steps)), f"{key}: a step logged twice in run {run_id}: {steps}"
    return {m.step: m.value for m in history}


def _at_training_step(patch: pytest.MonkeyPatch, action: Callable[[int], None]) -> None:
    """Call ``action(step)`` inside the forward pass of each training step (gradient accumulation 1: one forward a
    step), in the middle of the step."""
    from transformers import Idefics2ForConditionalGeneration

    real_forward = Idefics2ForConditionalGeneration.forward
    count = [0]

    @functools.wraps(real_forward)  # the Trainer finds the model's label names in its forward's signature
    def forward(self, *args, **kwargs):
        if self.training:
            count[0] += 1
            action(count[0])
        return real_forward(self, *args, **kwargs)

    patch.setattr(Idefics2ForConditionalGeneration, "forward", forward)


def _warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


# --------------------------------------------------------------------------------------------------------------------
# Fast: checkpoints, the signal flag, the sender and the outbox, reopening a run, the disk check


def _checkpoint(folder: Path, step: int, payload: bytes = b"weights") -> Path:
    staging = folder / STAGING / f"checkpoint-{step}"
    staging.mkdir(parents=True)
    (staging / "adapter_model.safetensors").write_bytes(payload)
    (staging / "trainer_state.json").write_text("{}")
    return publish(staging, folder, step, run_id=f"run-{step}", keep=None)


def test_only_complete_checkpoints_are_trusted_and_the_incomplete_ones_are_named(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    for step in (4, 8, 12):
        _checkpoint(folder, step)
    (folder / "checkpoint-12" / "adapter_model.safetensors").write_bytes(b"wei")  # cut short after it was sealed
    in_place = folder / "checkpoint-16"  # what a Trainer writing in place leaves when killed after trainer_state.json
    in_place.mkdir()
    (in_place / "trainer_state.json").write_text("{}")
    aside = folder / STAGING / "checkpoint-20"  # a save of ours killed midway
    aside.mkdir(parents=True)
    (aside / "adapter_model.safetensors").write_bytes(b"w")

    complete, incomplete = scan(folder)
    assert [c.step for c in complete] == [4, 8] and complete[-1].run_id == "run-8"
    reasons = {path.name: why for path, why in incomplete}
    assert reasons == {
        "checkpoint-20": "written aside by a save that did not finish",
        "checkpoint-12": "adapter_model.safetensors has 3 bytes, its manifest says 7",
        "checkpoint-16": f"no {MANIFEST}: its save did not finish",
    }
    with caplog.at_level(logging.WARNING):
        chosen = resume_point(folder)
    assert chosen.path == folder / "checkpoint-8" and chosen.step == 8
    said = _warnings(caplog, "checkpoint")
    assert [m for m in said if m.startswith("resuming from")] == [
        f"resuming from {chosen.path} (step 8, written by run run-8)"
    ]
    for name in reasons:  # each named, and removed: nothing a later resume could trust, no disk held
        assert any(name in m and "ignoring incomplete checkpoint" in m for m in said), name
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-4", "checkpoint-8"]


def test_a_published_checkpoint_keeps_the_newest_save_total_limit(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (4, 8, 12):
        staging = folder / STAGING / f"checkpoint-{step}"
        staging.mkdir(parents=True)
        (staging / "optimizer.pt").write_bytes(b"x" * step)
        publish(staging, folder, step, run_id="r", keep=2)
    assert sorted(p.name for p in folder.iterdir()) == [STAGING, "checkpoint-12", "checkpoint-8"]
    manifest = json.loads((folder / "checkpoint-12" / MANIFEST).read_text())
    assert manifest == {"step": 12, "run_id": "r", "files": {"optimizer.pt": 12}}
    assert not any((folder / STAGING).iterdir())


def test_a_preemption_signal_is_recorded_not_obeyed_and_the_handlers_come_back():
    request = PreemptionRequest()
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    with request.catching():
        os.kill(os.getpid(), signal.SIGUSR1)  # the default action would end this process
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
    assert request.requested and request.signal_name == "SIGUSR1"  # the first one
    assert {s: signal.getsignal(s) for s in before} == before
    assert EXIT_REQUEUE == 75 and Preempted("SIGUSR1", 3, "c").code == 75


@pytest.fixture
def run_id() -> str:
    client = MlflowClient()
    return client.create_run(client.create_experiment("outage")).info.run_id


SERVER_WITH_PASSWORD = "http://alice:pa55word-123@127.0.0.1:9"


def _server_down_for(monkeypatch, down: threading.Event) -> None:
    """MlflowClient.log_batch fails as it does when the server is away, while ``down`` is set."""
    real = MlflowClient.log_batch

    def log_batch(self, *args, **kwargs):
        if down.is_set():
            raise MlflowException(f"API request to {SERVER_WITH_PASSWORD}/api/2.0/mlflow/runs/log-batch: refused")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)


def test_step_metrics_wait_out_an_outage_with_one_warning_and_arrive_in_order(run_id, monkeypatch, caplog):
    down = threading.Event()
    down.set()
    _server_down_for(monkeypatch, down)
    sender = MetricSender(run_id, retry_s=0.02)
    with caplog.at_level(logging.WARNING):
        for step in range(1, 41):
            sender.log({"train_loss": 1 / step, "learning_rate": step * 1e-4}, step)
            time.sleep(0.002)  # the sender retries several times meanwhile
        down.clear()
        assert sender.close() == []
    assert _history(run_id) == {step: 1 / step for step in range(1, 41)}
    assert len(_history(run_id, "learning_rate")) == 40
    assert len(_warnings(caplog, "did not take")) == 1 and sender.outages == 1
    assert len(_warnings(caplog, "answers again")) == 1
    assert "http://[redacted]@127.0.0.1:9" in _warnings(caplog, "did not take")[0]  # never the server's password
    assert not _warnings(caplog, "pa55word")


def test_what_the_server_never_took_is_kept_and_sent_by_the_next_invocation(run_id, monkeypatch, tmp_path):
    down = threading.Event()
    down.set()
    _server_down_for(monkeypatch, down)
    sender = MetricSender(run_id, retry_s=0.02)
    for step in range(1, 6):
        sender.log({"train_loss": float(step)}, step)
    outbox = Outbox(tmp_path)
    preempted = Preempted("SIGUSR1", 5, "outputs/ss/checkpoints/checkpoint-5")
    end_preempted_run(preempted, sender, outbox)  # the server is away: the run's end waits in the outbox
    kept = json.loads(outbox.path.read_text())["runs"][run_id]
    assert [row[3] for row in kept["metrics"]] == [1, 2, 3, 4, 5] and kept["status"] == "KILLED"
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"

    down.clear()
    assert outbox.send() == [run_id] and not outbox.path.exists()
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED" and _history(run_id) == {s: float(s) for s in range(1, 6)}
    assert run.data.tags["killed_by"] == "SIGUSR1" and run.data.tags["preempted_at_step"] == "5"
    assert run.data.tags["preempted_checkpoint"] == "outputs/ss/checkpoints/checkpoint-5"


def test_a_run_can_be_reopened_to_finish_it_and_a_missing_one_becomes_a_new_run(project, caplog):
    from med_idefics.tracking.runs import tracked_run
    from med_idefics.tracking.store import setup_tracking

    params = load_params("params.yaml")
    with pytest.raises(RuntimeError), tracked_run(params, "x (seed 1)"):
        raise RuntimeError("the store went away")
    (failed,) = _runs()
    assert failed.info.status == "FAILED" and "error" in failed.data.tags
    with tracked_run(params, "x (seed 1)", resume_run_id=failed.info.run_id) as run:
        assert run.info.run_id == failed.info.run_id
    reopened = MlflowClient().get_run(failed.info.run_id)
    assert reopened.info.status == "FINISHED" and "error" not in reopened.data.tags
    assert reopened.data.tags["pid"] == str(os.getpid()) and reopened.info.run_name == "x (seed 1)"
    with caplog.at_level(logging.WARNING), tracked_run(params, "y (seed 1)", resume_run_id="0" * 32) as run:
        assert run.info.run_id != "0" * 32
    assert _warnings(caplog, f"run {'0' * 32} is not in this experiment")
    assert setup_tracking(params) and len(_runs()) == 2


def test_a_disk_too_small_is_refused_with_the_numbers(tmp_path):
    from med_idefics.modeling.checkpoints import SpaceNeed, free_bytes

    free = free_bytes(tmp_path)
    need = SpaceNeed(trainable=10**9, adapter=free, checkpoint=3 * free, checkpoints=3, existing=0, total=10 * free)
    with pytest.raises(DiskSpaceError) as refused:
        check_free_space(tmp_path / "checkpoints", need)
    message = str(refused.value)
    assert str(tmp_path / "checkpoints") in message and "1,000,000,000 trainable parameters" in message
    assert "save_total_limit 2" in message and "is free there" in message and "--out" in message


def test_a_save_cut_short_is_named_and_skipped_and_the_one_before_resumed(project, monkeypatch, caplog):
    """The process dies inside the Trainer's save at step 8 (its weights written, its optimizer not): the rerun names
    that save, ignores it and resumes from step 4; the estimate of a checkpoint's size is checked against one."""
    from transformers import Trainer

    from med_idefics.modeling.checkpoints import space_needed
    from med_idefics.modeling.loading import load_base_model
    from med_idefics.modeling.lora import add_lora

    params = load_params("params.yaml")  # 12 steps, a checkpoint every 4
    real_save = Trainer._save_optimizer_and_scheduler

    def killed_at_step_8(self, output_dir):
        if self.state.global_step == 8:
            raise KeyboardInterrupt  # as a kill: no handler of ours runs
        real_save(self, output_dir)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save_optimizer_and_scheduler", killed_at_step_8)
        with pytest.raises(KeyboardInterrupt):
            train(params, TrainRequest(STAGE, OUT))
    partial = CHECKPOINTS / STAGING / "checkpoint-8"
    assert (partial / "adapter_model.safetensors").is_file() and not (partial / "optimizer.pt").exists()
    assert not (CHECKPOINTS / "checkpoint-8").exists()
    (killed,) = _runs()
    written = sum(json.loads((CHECKPOINTS / "checkpoint-4" / MANIFEST).read_text())["files"].values())

    with caplog.at_level(logging.WARNING):
        summary = train(params, TrainRequest(STAGE, OUT))
    assert _warnings(caplog, f"ignoring incomplete checkpoint {partial} (written aside by a save that did not finish")
    assert _warnings(
        caplog, f"resuming from {CHECKPOINTS / 'checkpoint-4'} (step 4, written by run {killed.info.run_id}"
    )
    assert summary["optimizer_steps"] == 12
    resumed = _runs()[-1]
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumed_from_step"] == "4"
    assert resumed.data.tags["resumed_from_run_id"] == killed.info.run_id
    assert sorted(_history(resumed.info.run_id)) == list(range(5, 13))

    # the disk check's estimate of a checkpoint, against one this training wrote: never less, not much more
    model = add_lora(load_base_model(params.model.base_dir, params.quantization), params.lora)
    estimate = space_needed(model, 2).checkpoint
    assert written <= estimate <= 1.5 * written, (written, estimate)


# --------------------------------------------------------------------------------------------------------------------
# End to end (make test-long-runs): signals mid-training


@pytest.mark.long_runs
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_preemption_signal_saves_that_step_and_the_rerun_ends_as_an_uninterrupted_run(project, monkeypatch, signum):
    _recipe(epochs=3.0)  # 18 steps, a checkpoint and an evaluation every 4
    params = load_params("params.yaml")
    train(params, TrainRequest(STAGE, Path("outputs/whole")))
    (whole,) = _runs()
    step = random.SystemRandom().randint(2, 16)
    where = f"{signum.name} at step {step}"

    def send(n: int) -> None:
        if n == step:
            os.kill(os.getpid(), signum)

    with monkeypatch.context() as patch:
        _at_training_step(patch, send)
        with pytest.raises(Preempted) as stopped:
            train(params, TrainRequest(STAGE, OUT))
    assert stopped.value.code == EXIT_REQUEUE, where
    complete, incomplete = scan(CHECKPOINTS)
    assert complete[-1].step == step and not incomplete, where
    killed = _runs()[-1]
    tags = killed.data.tags
    assert killed.info.status == "KILLED" and tags["killed_by"] == signum.name, where
    assert tags["preempted_at_step"] == str(step) and tags["preempted_checkpoint"] == str(complete[-1].path)
    assert complete[-1].run_id == killed.info.run_id

    summary = train(params, TrainRequest(STAGE, OUT))
    resumed = _runs()[-1]
    assert resumed.info.status == "FINISHED" and resumed.info.run_name == killed.info.run_name, where
    assert resumed.data.tags["resumed_from_run_id"] == killed.info.run_id
    assert resumed.data.tags["resumed_from_step"] == str(step)
    assert MlflowClient().get_run(killed.info.run_id).data.tags["resumed_by_run_id"] == resumed.info.run_id
    for key in ("train_loss", "eval_loss", "learning_rate"):  # every step once, across the two runs: no gap, no twice
        before, after = _history(killed.info.run_id, key), _history(resumed.info.run_id, key)
        assert not set(before) & set(after), (where, key)
        assert before | after == _history(whole.info.run_id, key), (where, key)  # the same values, step by step
    assert sorted(_history(killed.info.run_id)) == list(range(1, step + 1))
    uninterrupted = load_file("outputs/whole/adapter/adapter_model.safetensors")
    continued = load_file(OUT / "adapter" / "adapter_model.safetensors")
    assert set(continued) == set(uninterrupted)
    for name, tensor in uninterrupted.items():
        assert (continued[name] == tensor).all(), (where, name)
    whole_summary = json.loads(Path("outputs/whole/train_summary.json").read_text())
    assert summary["train_loss"] == pytest.approx(whole_summary["train_loss"], rel=1e-6), where
    assert read_run_info(OUT)["resumed_from_checkpoint"] is True


@pytest.mark.long_runs
def test_the_train_command_exits_75_on_sigusr1_and_the_same_command_resumes(project):
    """What a Slurm job sees: `--signal=B:USR1@…` or a preemption, the command exits 75 (the batch script requeues on
    it), and the requeued job's same command resumes from the checkpoint of that step."""
    _recipe(epochs=10.0, save_steps=5)  # 60 steps
    command = [sys.executable, "-m", "med_idefics.cli", "train", STAGE, "--out", str(OUT)]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (CHECKPOINTS.exists() and scan(CHECKPOINTS)[0]):  # its first complete checkpoint
        assert first.poll() is None, "training ended before the signal"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.send_signal(signal.SIGUSR1)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == EXIT_REQUEUE, stderr[-3000:]
    (killed,) = _runs()
    step = int(killed.data.tags["preempted_at_step"])
    assert killed.info.status == "KILLED" and scan(CHECKPOINTS)[0][-1].step == step and 5 <= step < 60
    assert f"Stopped by SIGUSR1 at step {step}" in stderr

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {CHECKPOINTS / f'checkpoint-{step}'} (step {step}" in second.stderr
    resumed = _runs()[-1]
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumed_from_step"] == str(step)
    steps = sorted([*_history(killed.info.run_id), *_history(resumed.info.run_id)])
    assert steps == list(range(1, 61))
    assert json.loads((OUT / "train_summary.json").read_text())["optimizer_steps"] == 60


def _training_pipeline(repo_root: Path, stage: str) -> str:
    """Make the tmp project a git + DVC repository whose pipeline is dvc.yaml's training stage ``stage`` as shipped
    (its command, params and outputs; the data as its dependency), as `med-idefics repro --slurm` submits it; the
    folder its command trains into."""
    shipped = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"][stage]
    pipeline = {"cmd": shipped["cmd"], "deps": ["data"], "params": shipped["params"], "outs": shipped["outs"]}
    Path("dvc.yaml").write_text(yaml.safe_dump({"stages": {stage: pipeline}}, sort_keys=False))
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["cluster"]["slurm"]["sqlite_single_node"] = True  # one node: the test's own sqlite store
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    identity = ["-c", "user.name=t", "-c", "user.email=t@t"]
    for command in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"], ["git", "add", "-A"],
                    ["git", *identity, "commit", "-qm", "a training stage"]):  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
    return shipped["cmd"].split("--out ")[1].split()[0]


def _job(job_id: str) -> dict[str, str]:
    """`scontrol show job`'s fields (the test cluster keeps no accounting for sacct; finished jobs stay an hour)."""
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return dict(word.partition("=")[::2] for word in shown.split())


def _until(condition: Callable[[], bool], seconds: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {seconds:.0f} s for {what}; the job's log:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.mark.long_runs
def test_scontrol_requeue_of_a_running_training_job_resumes_and_finishes(project, slurm, repo_root):
    """The cluster issue's test cluster (`slurm`: skips, saying why, where Slurm cannot run). The training stage
    submitted as users submit it (`med-idefics repro --slurm`: its batch script runs `dvc repro --single-item`), then
    `scontrol requeue` of the running job past its first checkpoint — Slurm's SIGTERM to every process of the job, as
    on preemption: the training saves the step it is at and ends its run KILLED before Slurm's KillWait (5 s here) is
    up; the batch shell waits for it and does not requeue again; the job's second start resumes and finishes."""
    from click.testing import CliRunner

    from med_idefics.cli import main

    _recipe(epochs=20.0, save_steps=5)  # 120 steps: the requeue comes long before the end
    out = Path(_training_pipeline(repo_root, "single_stage"))
    checkpoints, log = out / "checkpoints", Path("outputs/logs/single_stage.log")
    submitted = CliRunner().invoke(main, ["repro", "--slurm"], catch_exceptions=False)
    assert submitted.exit_code == 0, submitted.output
    (job_id,) = [line.split("job ")[1] for line in submitted.output.splitlines() if line.startswith("submitted ")]

    def past_first_checkpoint() -> bool:
        assert _job(job_id)["JobState"] in ("PENDING", "RUNNING"), log.read_text()[-3000:]
        return checkpoints.exists() and bool(scan(checkpoints)[0])

    _until(past_first_checkpoint, 300, "the training's first checkpoint", log)
    first = scan(checkpoints)[0][0].step
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    _until(lambda: _job(job_id)["JobState"] == "PENDING", 120, "the first start to end, the job requeued", log)
    (killed,) = _runs()
    tags = killed.data.tags  # ended by the training itself, with the tags of its stop: it fit in KillWait
    step = int(tags["preempted_at_step"])
    assert killed.info.status == "KILLED" and tags["killed_by"] == "SIGTERM" and first <= step < 120
    assert tags["preempted_checkpoint"] == str(checkpoints / f"checkpoint-{step}")
    assert scan(checkpoints)[0][-1].step == step and not scan(checkpoints)[1]

    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)  # Slurm waits ~2 min
    _until(lambda: _job(job_id)["JobState"] == "COMPLETED", 600, "the requeued job to finish", log)
    job, text = _job(job_id), log.read_text()
    assert job["Restarts"] == "1" and text.count(f"job {job_id} on ") == 2  # it ran twice
    assert ", start 1," in text and ", start 2," in text and "DUE TO JOB REQUEUE" in text
    assert "SIGTERM: Slurm ends or requeues this job itself" in text
    assert "requeueing" not in text  # the batch shell did not requeue on top of Slurm
    assert f"resuming from {checkpoints / f'checkpoint-{step}'} (step {step}" in text

    killed, resumed = _runs()
    assert killed.info.status == "KILLED" and killed.data.tags["resumed_by_run_id"] == resumed.info.run_id
    assert resumed.info.status == "FINISHED" and resumed.info.run_name == killed.info.run_name
    assert resumed.data.tags["resumed_from_run_id"] == killed.info.run_id
    assert resumed.data.tags["resumed_from_step"] == str(step)
    assert resumed.data.tags["resumed_from_checkpoint"] == str(checkpoints / f"checkpoint-{step}")
    before, after = _history(killed.info.run_id), _history(resumed.info.run_id)
    assert sorted(before) == list(range(1, step + 1)) and sorted(after) == list(range(step + 1, 121))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "train_summary.json").read_text())["optimizer_steps"] == 120
    assert not MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()],
                                          "attributes.status = 'RUNNING'")  # fmt: skip
    queue = subprocess.run(["squeue", "-h", "-t", "PD,R,CG,CF,S"], capture_output=True, text=True, check=True)
    assert queue.stdout.strip() == ""  # nothing left queued
    status = subprocess.run([str(BIN / "dvc"), "status"], capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout  # DVC recorded the stage the second start ran


# --------------------------------------------------------------------------------------------------------------------
# End to end: a real `mlflow server`, stopped and started again on the same store


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    """`mlflow server` on a sqlite store with proxied artifacts, on a fixed port: stopped, started again."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
                   "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1"]  # fmt: skip
        with open(self.folder / "server.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()[-3000:]
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
            time.sleep(0.25)
        raise AssertionError(
            f"mlflow server did not answer in 120 s: {(self.folder / 'server.log').read_text()[-3000:]}"
        )

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # its uvicorn worker, should it outlive it
            os.killpg(self.process.pid, signal.SIGKILL)


@pytest.fixture
def server(tmp_path_factory, monkeypatch) -> Iterator[_Server]:
    """The tracking server this test logs to. The client gives up on a request after one retry of at most 5 s
    (MLflow's defaults retry for minutes), so that the outage shows within a step or two."""
    server = _Server(tmp_path_factory.mktemp("server"))
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    mlflow.set_tracking_uri(server.url)
    try:
        yield server
    finally:
        server.stop()


OUTAGE_S = 60


@pytest.mark.long_runs
def test_training_goes_on_through_a_minute_without_the_tracking_server(project, server, monkeypatch, caplog):
    _recipe(epochs=5.0)  # 30 steps; the outage covers about twenty of them
    outage: dict[str, float] = {}

    def at_step(n: int) -> None:
        if n == 3:
            server.stop()
            outage["from"] = time.time()
        elif "from" in outage and "to" not in outage:
            if time.time() - outage["from"] >= OUTAGE_S:
                server.start()
                outage["to"] = time.time()
            else:
                time.sleep(3)  # slow steps: the outage spans many

    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING):
        _at_training_step(patch, at_step)
        summary = train(load_params("params.yaml"), TrainRequest(STAGE, OUT))
    assert "to" in outage and outage["to"] - outage["from"] >= OUTAGE_S
    assert summary["optimizer_steps"] == 30
    (run,) = _runs()
    assert run.info.status == "FINISHED"
    assert sorted(_history(run.info.run_id)) == list(range(1, 31))  # every step, those of the outage too
    during = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "train_loss")
              if outage["from"] * 1000 < m.timestamp < outage["to"] * 1000]  # fmt: skip
    assert len(during) >= 10, during  # trained while the server was away, logged when it came back
    assert len(_warnings(caplog, "did not take")) == 1, _warnings(caplog, "")
    assert len(_warnings(caplog, "answers again")) == 1
    assert "adapter/adapter_model.safetensors" in {
        a.path for a in MlflowClient().list_artifacts(run.info.run_id, "adapter")
    }


@pytest.mark.long_runs
def test_an_adapter_trained_while_the_server_stays_away_is_kept_and_the_rerun_logs_it_without_training(
    project, server, monkeypatch
):
    from transformers import Trainer

    _recipe(epochs=2.0)  # 12 steps
    params = load_params("params.yaml")
    with monkeypatch.context() as patch:
        _at_training_step(patch, lambda n: server.stop() if n == 3 else None)
        with pytest.raises(TrackingUnavailable) as failed:
            train(params, TrainRequest(STAGE, OUT))
    message = str(failed.value)
    assert str(OUT / ".unlogged") in message and "run the same command" in message and "without training" in message
    trained = load_file(OUT / "adapter" / "adapter_model.safetensors")
    assert (OUT / ".unlogged" / "state.json").is_file() and (OUT / ".tracking-outbox.json").is_file()
    # `dvc repro` deletes a stage's outputs before it runs the stage again
    shutil.rmtree(OUT / "adapter")
    (OUT / "train_summary.json").unlink()
    (OUT / "run_info.json").unlink()

    server.start()
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train", lambda *a, **k: pytest.fail("trained again"))
        summary = train(params, TrainRequest(STAGE, OUT))
    (run,) = _runs()  # the run that trained it, finished by the rerun
    assert run.info.status == "FINISHED" and read_run_info(OUT)["run_id"] == run.info.run_id
    assert sorted(_history(run.info.run_id)) == list(range(1, 13))
    assert run.data.metrics["final_optimizer_steps"] == summary["optimizer_steps"] == 12
    restored = load_file(OUT / "adapter" / "adapter_model.safetensors")
    assert all((restored[name] == tensor).all() for name, tensor in trained.items())
    logged = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/adapter/adapter_model.safetensors")
    assert all((load_file(logged)[name] == tensor).all() for name, tensor in trained.items())
    assert not (OUT / ".unlogged").exists() and not (OUT / ".tracking-outbox.json").exists()


@pytest.mark.long_runs
def test_an_evaluation_the_server_did_not_take_keeps_its_predictions_and_the_rerun_logs_them(
    project, server, monkeypatch
):
    from med_idefics.stages import evaluate as evaluate_stage

    train(load_params("params.yaml", ["single_stage.max_steps=2"]), TrainRequest(STAGE, Path("outputs/single-stage")))
    params = load_params("params.yaml")
    request = evaluate_stage.EvalRequest("single-stage", ["vqa-rad"])
    real_answers = evaluate_stage._answers

    def answer_then_lose_the_server(*args, **kwargs):
        answers = real_answers(*args, **kwargs)
        server.stop()
        return answers

    with monkeypatch.context() as patch:
        patch.setattr(evaluate_stage, "_answers", answer_then_lose_the_server)
        with pytest.raises(TrackingUnavailable) as failed:
            evaluate_stage.evaluate(params, request)
    kept = Path("outputs/.unlogged-evaluations/single-stage/vqa-rad/predictions.jsonl")
    assert str(kept.parent) in str(failed.value) and "without generating again" in str(failed.value)
    predictions = kept.read_text()
    Path("outputs/predictions/single-stage/vqa-rad.jsonl").unlink()  # as `dvc repro` before running it again

    server.start()
    with monkeypatch.context() as patch:
        patch.setattr(evaluate_stage, "_answers", lambda *a, **k: pytest.fail("generated again"))
        evaluate_stage.evaluate(params, request)
    (run,) = [r for r in _runs() if r.info.run_name == "eval-single-stage-vqa-rad"]
    assert run.info.status == "FINISHED" and run.data.metrics["n"] == len(predictions.splitlines())
    assert Path("outputs/predictions/single-stage/vqa-rad.jsonl").read_text() == predictions
    assert read_run_info("metrics/single-stage")["eval_runs"]["vqa-rad"] == run.info.run_id
    assert not Path("outputs/.unlogged-evaluations").exists()


# --------------------------------------------------------------------------------------------------------------------
# End to end: a small disk


@contextlib.contextmanager
def _small_disk(folder: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of ``size_bytes`` mounted on ``folder`` (root only: the test skips, saying so, elsewhere)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'needs root'}): the full-disk checks")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def _tiny_need(params):
    from med_idefics.modeling.checkpoints import space_needed
    from med_idefics.modeling.loading import load_base_model
    from med_idefics.modeling.lora import add_lora

    return space_needed(add_lora(load_base_model(params.model.base_dir, params.quantization), params.lora), 2)


@pytest.mark.long_runs
def test_training_a_small_disk_cannot_hold_is_refused_before_any_run(project):
    params = load_params("params.yaml")
    need = _tiny_need(params)
    with _small_disk(project / "disk", need.total // 2) as disk, pytest.raises(DiskSpaceError) as refused:
        train(params, TrainRequest(STAGE, disk / "ss"))
    message = str(refused.value)
    assert str(disk / "ss" / "checkpoints") in message and f"{need.trainable:,} trainable parameters" in message
    assert _runs() == []


@pytest.mark.long_runs
def test_a_disk_that_fills_during_training_stops_it_naming_the_folder_and_leaves_nothing_to_trust(project, monkeypatch):
    params = load_params("params.yaml")  # 12 steps, a checkpoint every 4
    need = _tiny_need(params)
    with _small_disk(project / "disk", need.total + need.checkpoint) as disk:
        out = disk / "ss"
        filler = disk / "someone-else's-file"

        def fill(n: int) -> None:
            if n == 6:  # checkpoint-4 is saved; leave too little for checkpoint-8
                filler.write_bytes(b"\1" * (shutil.disk_usage(disk).free - need.adapter // 2))

        with monkeypatch.context() as patch:
            _at_training_step(patch, fill)
            with pytest.raises(DiskSpaceError) as full:
                train(params, TrainRequest(STAGE, out))
        message = str(full.value)
        assert f"the disk of {out / 'checkpoints'} filled while saving checkpoint-8" in message
        assert f"the last complete one is {out / 'checkpoints' / 'checkpoint-4'}" in message
        complete, incomplete = scan(out / "checkpoints")
        assert [c.step for c in complete] == [4] and incomplete == []  # nothing half-written left to trust
        (failed,) = _runs()
        assert failed.info.status == "FAILED" and failed.data.tags["error"].startswith("DiskSpaceError")

        filler.unlink()
        summary = train(params, TrainRequest(STAGE, out))
        assert summary["optimizer_steps"] == 12 and _runs()[-1].data.tags["resumed_from_step"] == "4"
