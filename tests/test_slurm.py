"""``med-idefics repro --slurm`` and its batch scripts: what each job asks for, the cluster's realities checked before
anything is submitted, and — on a real single-node Slurm cluster (the ``slurm`` fixture, tests/slurm_cluster.py) — a
stand-in pipeline whose failing stage cancels its dependents, a refused partition, and a training stage that
checkpoints on USR1 and is requeued. The demo pipeline itself runs on the cluster in ``make slurm-smoke``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner

from med_idefics.cli import main
from med_idefics.config import ConfigError, load_params
from med_idefics.workflow import cluster, cluster_checks, jobsignal, launch, slurm
from med_idefics.workflow.profiles import apply_profile

BIN = Path(sys.executable).parent
STANDIN = '''#!/usr/bin/env python3
"""Stand-in for `med-idefics train NAME OUT MODE`: ok | fail | checkpoint (exit 75 on USR1 or TERM; then 0) |
slow-checkpoint (the same, its checkpoint written 2 s after the signal)."""
import pathlib, signal, sys, time
name, out, mode = sys.argv[2], pathlib.Path(sys.argv[3]), sys.argv[4]
if mode == "fail":
    print(f"{name}: failing on purpose", flush=True)
    sys.exit(3)
if mode.endswith("checkpoint") and not pathlib.Path(f"{name}.checkpoint").exists():
    def stop(signum, frame):
        pathlib.Path(f"{name}.{signal.Signals(signum).name}").touch()
        if mode == "slow-checkpoint":
            time.sleep(2)
        pathlib.Path(f"{name}.checkpoint").touch()
        print(f"{name}: {signal.Signals(signum).name}: checkpoint saved, exit 75", flush=True)
        sys.exit(75)
    signal.signal(signal.SIGUSR1, stop)
    signal.signal(signal.SIGTERM, stop)
    pathlib.Path(f"{name}.ready").touch()
    while True:
        time.sleep(0.2)
out.write_text(name + "\\n")
'''


def paper_params(repo_root):
    from med_idefics.config import Params, build

    return build(Params, apply_profile(yaml.safe_load((repo_root / "params.yaml").read_text()), "paper"))


# --------------------------------------------------------------------------------------------------------------------
# Batch scripts


def test_a_paper_training_job_asks_for_its_gpu_requeues_and_forwards_usr1(repo_root, tmp_path):
    params = paper_params(repo_root)
    job = cluster.stage_job("stage1", "med-idefics train stage1 --out outputs/stage1", params, tmp_path / "logs")
    script = slurm.batch_script(job, params.cluster.slurm, tmp_path)
    lines = script.splitlines()
    assert "#SBATCH --gres=gpu:1" in lines
    assert "#SBATCH --time=720" in lines and "#SBATCH --mem=64G" in lines and "#SBATCH --cpus-per-task=6" in lines
    assert "#SBATCH --requeue" in lines and "#SBATCH --signal=B:USR1@300" in lines
    assert f"#SBATCH --output={tmp_path / 'logs' / 'stage1.log'}" in lines and "#SBATCH --export=ALL" in lines
    assert "dvc --wait-for-lock repro --single-item stage1 &" in lines
    assert "trap on_usr1 USR1" in lines and 'scontrol requeue "$SLURM_JOB_ID" && exit 0' in script
    assert "MED_IDEFICS_LAUNCHER" not in script  # one GPU: no torchrun
    assert f"source {Path(sys.prefix) / 'bin' / 'activate'}" in lines


@pytest.mark.parametrize(
    ("name", "command", "gres"),
    [
        ("evaluate@two-stage", "med-idefics evaluate --variant two-stage --suite all", "#SBATCH --gres=gpu:1"),
        ("report", "med-idefics report --metrics-dir metrics", None),
        ("register", "med-idefics register --records-dir outputs/registry/versions", None),
        ("promote", "med-idefics promote --out outputs/registry/promotion.json", None),
    ],
)
def test_only_training_and_evaluation_ask_for_a_gpu(repo_root, tmp_path, name, command, gres):
    params = paper_params(repo_root)
    script = slurm.batch_script(cluster.stage_job(name, command, params, tmp_path), params.cluster.slurm, tmp_path)
    assert [line for line in script.splitlines() if "--gres" in line] == ([gres] if gres else [])
    assert "--requeue" not in script and "trap" not in script  # only a training checkpoints and requeues


def test_several_gpus_start_torchrun_and_several_nodes_rendezvous_on_the_first(repo_root, tmp_path):
    params = load_params(repo_root / "params.yaml", ["cluster.slurm.gpus_per_training=4"])
    job = cluster.stage_job("stage2", "med-idefics train stage2", params, tmp_path)
    script = slurm.batch_script(job, params.cluster.slurm, tmp_path)
    assert "#SBATCH --gres=gpu:4" in script.splitlines()
    assert 'export MED_IDEFICS_LAUNCHER="torchrun --standalone --nnodes=1 --nproc-per-node=4"' in script
    params = load_params(
        repo_root / "params.yaml", ["cluster.slurm.gpus_per_training=4", "cluster.slurm.nodes_per_training=2"]
    )
    job = cluster.stage_job("stage2", "med-idefics train stage2", params, tmp_path)
    script = slurm.batch_script(job, params.cluster.slurm, tmp_path)
    assert "#SBATCH --nodes=2" in script.splitlines()
    assert 'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "srun --nodes=2 --ntasks-per-node=1 torchrun --nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d" in script
    assert 'srun --overlap --nodes="$SLURM_NNODES"' in script  # USR1 reaches the other nodes' trainings too


def test_partition_account_qos_and_extra_lines_come_from_params(repo_root, tmp_path):
    overrides = ["cluster.slurm.partition=gpu-a100", "cluster.slurm.account=medlab", "cluster.slurm.qos=long"]
    overrides.append("cluster.slurm.extra=['--constraint=a100', '--exclude=node13']")
    params = load_params(repo_root / "params.yaml", overrides)
    script = slurm.batch_script(
        cluster.stage_job("report", "med-idefics report", params, tmp_path), params.cluster.slurm, tmp_path
    )
    for line in ("--partition=gpu-a100", "--account=medlab", "--qos=long", "--constraint=a100", "--exclude=node13"):
        assert f"#SBATCH {line}" in script.splitlines()
    with pytest.raises(ConfigError, match=r"cluster\.slurm\.extra"):
        load_params(repo_root / "params.yaml", ["cluster.slurm.extra=['constraint=a100']"])


def test_no_secret_is_written_into_a_batch_script(repo_root, tmp_path, monkeypatch):
    secret = "hf_NotWrittenAnywhere123"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://user:pw-in-uri@mlflow.example:5000")
    params = paper_params(repo_root)
    for name, command in (("base", "med-idefics base"), ("stage1", "med-idefics train stage1")):
        script = slurm.batch_script(cluster.stage_job(name, command, params, tmp_path), params.cluster.slurm, tmp_path)
        assert secret not in script and "pw-in-uri" not in script and "HF_TOKEN" not in script


def test_the_dry_run_prints_every_batch_script_and_submits_nothing(repo_root, tmp_path, monkeypatch):
    """In a tmp DVC repository with three stages: every stale stage's script, in order, each after its deps."""
    repo = _standin_repo(
        tmp_path, {"a": ("train", "ok", []), "b": ("evaluate", "ok", ["a"]), "c": ("report", "ok", ["b"])}
    )
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch: a dry run needs none
    result = CliRunner().invoke(main, ["repro", "--slurm", "--dry-run"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.count("#!/bin/bash") == 3
    assert "# b: sbatch --parsable --dependency=afterok:<a> --kill-on-invalid-dep=yes" in result.output
    assert "# 3 jobs (dry run: nothing submitted)" in result.output


# --------------------------------------------------------------------------------------------------------------------
# The cluster's realities, before anything is submitted


def test_a_sqlite_store_is_refused_unless_the_cluster_has_one_node(repo_root, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    with pytest.raises(ConfigError, match=r"team's MLflow server.*sqlite_single_node: true"):
        cluster_checks.check_tracking_store(load_params(repo_root / "params.yaml"))
    single_node = ["cluster.slurm.sqlite_single_node=true"]
    cluster_checks.check_tracking_store(load_params(repo_root / "params.yaml", single_node))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    cluster_checks.check_tracking_store(load_params(repo_root / "params.yaml"))


def test_on_nfs_dvc_must_use_hardlink_locks(tmp_path):
    repo = _standin_repo(tmp_path, {"a": ("report", "ok", [])})
    mounts = f"server:/export {repo.parent} nfs4 rw 0 0\n/dev/sda1 / ext4 rw 0 0\n"
    assert cluster_checks.filesystem_type(repo, mounts) == "nfs4"
    with pytest.raises(ConfigError, match=r"dvc config core\.hardlink_lock true"):
        cluster_checks.check_dvc_lock(repo, mounts)
    subprocess.run([str(BIN / "dvc"), "config", "core.hardlink_lock", "true"], cwd=repo, check=True)
    cluster_checks.check_dvc_lock(repo, mounts)
    cluster_checks.check_dvc_lock(repo, "/dev/sda1 / ext4 rw 0 0\n")  # a local disk: no lock to change


def test_a_hub_base_is_resolved_and_fetched_on_the_login_node(repo_root, tmp_path, monkeypatch):
    """`base` runs here (not in a job: compute nodes may have no network), then the snapshot it pins is fetched."""
    import huggingface_hub

    params = paper_params(repo_root)
    ran, fetched = [], []

    def fake_run(command, **_):
        ran.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(cluster_checks.subprocess, "run", fake_run)
    from med_idefics.modeling.loading import write_pointer

    base_dir = tmp_path / "base"
    base_dir.mkdir()
    write_pointer(base_dir, {"source": "hub", "id": params.model.base, "revision": "0" * 40})
    params.model.base_dir = str(base_dir)

    def snapshot(**kwargs):
        fetched.append(kwargs)
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return "/cache/snapshot"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    left = cluster_checks.prepare_hub_base(params, ["base", "stage1"], dry_run=False, echo=lambda _: None)
    assert left == ["stage1"]
    assert ran == [[*cluster_checks.DVC, "--wait-for-lock", "repro", "--single-item", "base"]]
    assert [f.get("local_files_only", False) for f in fetched] == [True, False]
    assert fetched[1]["repo_id"] == params.model.base and fetched[1]["revision"] == "0" * 40


def test_only_cluster_keys_can_be_set_for_the_jobs(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    assert cluster.cluster_params(["cluster.slurm.partition=gpu"]).cluster.slurm.partition == "gpu"
    with pytest.raises(ConfigError, match=r"only cluster\.\* keys"):
        cluster.cluster_params(["stage2.lr=1e-3"])


def test_without_sbatch_repro_slurm_says_where_to_run_it(tmp_path, monkeypatch):
    repo = _standin_repo(tmp_path, {"a": ("report", "ok", [])})
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PATH", "/nonexistent")
    result = CliRunner().invoke(main, ["repro", "--slurm"])
    assert result.exit_code != 0
    assert "sbatch" in result.output and "login node" in result.output and "repro --jobs" in result.output


# --------------------------------------------------------------------------------------------------------------------
# USR1 to the training processes only; torchrun


@pytest.mark.parametrize(
    ("argv", "training"),
    [
        (["/v/bin/python", "/v/bin/med-idefics", "train", "stage1", "--out", "o"], True),
        (["/v/bin/python", "-u", "-m", "med_idefics.cli", "train", "stage2"], True),  # a torchrun worker
        (["/v/bin/python", "/v/bin/torchrun", "--nproc-per-node=2", "-m", "med_idefics.cli", "train", "x"], False),
        (["/v/bin/python", "/v/bin/dvc", "--wait-for-lock", "repro", "--single-item", "stage1"], False),
        (["/bin/sh", "-c", "med-idefics train stage1"], False),
        (["/v/bin/python", "/v/bin/med-idefics", "evaluate", "--variant", "base"], False),
    ],
)
def test_usr1_goes_to_trainings_not_to_dvc_torchrun_or_a_shell(argv, training):
    assert jobsignal.is_training(argv) is training


def test_dataloader_workers_of_a_training_are_not_signalled(tmp_path):
    """Forked workers keep the training's command line: only the topmost training of each chain is signalled, and
    only this job's processes — of this cluster, where $SLURM_CONF says which (test clusters number jobs alike)."""
    training = ["/v/bin/python", "/v/bin/med-idefics", "train", "stage1"]
    table = {
        10: (["/bin/bash", "/var/spool/slurm/job"], 1, "7", "/a"),
        11: (["/v/bin/python", "/v/bin/dvc", "repro", "--single-item", "stage1"], 10, "7", "/a"),
        12: (training, 11, "7", "/a"),
        13: (training, 12, "7", "/a"),  # a DataLoader worker
        20: (training, 1, "8", "/a"),  # another job's training
        30: (training, 1, "7", "/b"),  # job 7 of another cluster on this machine
    }
    for pid, (argv, parent, job, conf) in table.items():
        folder = tmp_path / str(pid)
        folder.mkdir()
        (folder / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (folder / "environ").write_bytes(f"PATH=/bin\0SLURM_JOB_ID={job}\0SLURM_CONF={conf}\0".encode())
        (folder / "stat").write_text(f"{pid} (python) S {parent} 1 1")
    assert jobsignal.training_processes("7", tmp_path, conf="/a") == [12]
    assert jobsignal.training_processes("7", tmp_path) == [12, 30]  # no $SLURM_CONF: a real cluster's one slurmd


def test_the_training_relaunches_itself_under_the_launcher_once():
    argv = ["/v/bin/med-idefics", "train", "stage2", "--out", "o"]
    launcher = {"MED_IDEFICS_LAUNCHER": "torchrun --standalone --nproc-per-node=2"}
    assert launch.launch_command(argv, launcher) == [
        "torchrun", "--standalone", "--nproc-per-node=2", "-m", "med_idefics.cli", "train", "stage2", "--out", "o",
    ]  # fmt: skip
    assert launch.launch_command(argv, {**launcher, "LOCAL_RANK": "0"}) is None  # torchrun's worker: train here
    assert launch.launch_command(argv, {}) is None


# --------------------------------------------------------------------------------------------------------------------
# On a real cluster


def _standin_repo(tmp_path: Path, stages: dict[str, tuple[str, str, list[str]]]) -> Path:
    """A git + DVC repository whose stages run the stand-in ``./med-idefics <kind> <name> <out> <mode>``; each stage
    writes ``<name>.txt`` and reads its deps' files."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "med-idefics").write_text(STANDIN)
    (repo / "med-idefics").chmod(0o755)
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["cluster"]["slurm"]["sqlite_single_node"] = True  # one node: the tests' own sqlite store
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_stages = {
        name: {"cmd": f"./med-idefics {kind} {name} {name}.txt {mode}", "deps": [f"{d}.txt" for d in deps] or None,
               "outs": [f"{name}.txt"]}
        for name, (kind, mode, deps) in stages.items()
    }  # fmt: skip
    for stage in dvc_stages.values():
        if stage["deps"] is None:
            del stage["deps"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": dvc_stages}, sort_keys=False))
    for command in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(command, cwd=repo, check=True)
    identity = ["-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", *identity, "commit", "-qm", "stand-in"], cwd=repo, check=True)
    return repo


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    pytest.fail(f"waited {seconds:.0f} s for {what}")


def test_a_failed_stage_cancels_its_dependents_and_names_itself(slurm, tmp_path, monkeypatch):
    repo = _standin_repo(
        tmp_path,
        {
            "a": ("train", "ok", []),
            "b": ("evaluate", "fail", ["a"]),
            "c": ("report", "ok", ["b"]),
            "d": ("report", "ok", []),
        },
    )
    monkeypatch.chdir(repo)
    monkeypatch.setattr(cluster, "POLL_SECONDS", 0.5)
    result = CliRunner().invoke(main, ["repro", "--slurm", "--wait"])
    assert result.exit_code == 1, result.output
    assert "Error: stage b failed (FAILED, NonZeroExitCode)" in result.output and "outputs/logs/b.log" in result.output
    assert "b: failing on purpose" in result.output  # the failed stage's log tail
    assert "CANCELLED c was cancelled: a stage it depends on failed" in result.output
    assert (repo / "a.txt").is_file() and (repo / "d.txt").is_file() and not (repo / "c.txt").exists()
    queue = subprocess.run(["squeue", "-h", "-t", "PD,R"], capture_output=True, text=True)
    assert queue.stdout.strip() == ""  # nothing left pending


def test_an_unknown_partition_is_refused_naming_the_stage_and_the_key(slurm, tmp_path, monkeypatch):
    repo = _standin_repo(tmp_path, {"a": ("train", "ok", []), "b": ("report", "ok", ["a"])})
    monkeypatch.chdir(repo)
    result = CliRunner().invoke(main, ["repro", "--slurm", "--set", "cluster.slurm.partition=nope"])
    assert result.exit_code == 1
    assert "a: sbatch refused the job" in result.output and "cluster.slurm.partition" in result.output
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip() == ""


def test_a_training_checkpointed_on_usr1_is_requeued_and_finishes(slurm, tmp_path, monkeypatch):
    """Slurm's USR1 before the time limit (sent here by hand: `scancel --signal=USR1 --batch`) reaches the training
    through DVC; it exits 75; the job requeues itself and, started again, finishes the stage."""
    repo = _standin_repo(tmp_path, {"t": ("train", "checkpoint", [])})
    monkeypatch.chdir(repo)
    (job_id,) = cluster.repro_slurm(cluster.cluster_params([]), echo=lambda _: None)
    _wait_for((repo / "t.ready").exists, 60, "the stand-in training to start")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    _wait_for(lambda: slurm_state(job_id) == "PENDING", 60, "the job to requeue itself")
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)  # Slurm waits ~2 min
    _wait_for(lambda: slurm_state(job_id) == "COMPLETED", 60, "the requeued job to finish")
    log = (repo / "outputs" / "logs" / "t.log").read_text()
    assert (repo / "t.SIGUSR1").exists() and (repo / "t.txt").is_file()
    assert "exited with 75" in log  # DVC, not killed by USR1, reported the training's status
    assert f"requeueing job {job_id}" in log and ", start 2," in log
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=repo, capture_output=True, text=True)
    assert "up to date" in status.stdout


def test_a_cancelled_training_is_not_requeued(slurm, tmp_path, monkeypatch):
    """scancel's SIGTERM also makes the training checkpoint and exit 75: the job stays CANCELLED."""
    repo = _standin_repo(tmp_path, {"t": ("train", "checkpoint", [])})
    monkeypatch.chdir(repo)
    (job_id,) = cluster.repro_slurm(cluster.cluster_params([]), echo=lambda _: None)
    _wait_for((repo / "t.ready").exists, 60, "the stand-in training to start")
    subprocess.run(["scancel", job_id], check=True)
    _wait_for((repo / "t.SIGTERM").exists, 30, "the training to get SIGTERM")
    _wait_for(lambda: slurm_state(job_id) not in ("RUNNING", "COMPLETING"), 30, "the job to end")
    time.sleep(3)
    assert slurm_state(job_id) == "CANCELLED" and job_field(job_id, "Restarts") == "0"
    assert "requeueing" not in (repo / "outputs" / "logs" / "t.log").read_text()


def test_a_requeue_by_slurm_waits_for_the_checkpoint_and_is_not_doubled(slurm, tmp_path, monkeypatch):
    """`scontrol requeue` (as a preemption does): Slurm's SIGTERM reaches every process of the job, DVC too, which
    dies of it. The batch shell waits for the training's checkpoint (Slurm kills what is left of a job the moment its
    shell exits: this one's would be cut short) and does not requeue on top of Slurm: the job runs again once."""
    repo = _standin_repo(tmp_path, {"t": ("train", "slow-checkpoint", [])})
    monkeypatch.chdir(repo)
    (job_id,) = cluster.repro_slurm(cluster.cluster_params([]), echo=lambda _: None)
    _wait_for((repo / "t.ready").exists, 60, "the stand-in training to start")
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    _wait_for(lambda: slurm_state(job_id) == "PENDING", 60, "the requeued job to wait for its next start")
    assert (repo / "t.SIGTERM").exists() and (repo / "t.checkpoint").exists()  # saved, 2 s after the signal
    log = (repo / "outputs" / "logs" / "t.log").read_text()
    assert "SIGTERM: Slurm ends or requeues this job itself" in log and "the training processes on" in log
    assert "requeueing" not in log and job_field(job_id, "Restarts") == "1"
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)  # Slurm waits ~2 min
    _wait_for(lambda: slurm_state(job_id) == "COMPLETED", 60, "the requeued job to finish")
    assert (repo / "t.txt").is_file() and job_field(job_id, "Restarts") == "1"


def job_field(job_id: str, key: str) -> str:
    """A field of `scontrol show job` (no accounting on the test cluster for sacct)."""
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return dict(word.partition("=")[::2] for word in shown.split())[key]


def slurm_state(job_id: str) -> str:
    done = subprocess.run(
        ["squeue", "-h", "--states=all", f"--jobs={job_id}", "-o", "%T"], capture_output=True, text=True
    )
    return done.stdout.strip()


def test_offline_a_hub_base_resolves_to_the_commit_the_login_node_fetched(tmp_path, monkeypatch):
    """A seed's experiment re-runs `base` in a job, offline: the HF cache's commit for the branch, no network."""
    from huggingface_hub import constants

    from med_idefics.modeling.bases import resolve_hub_revision

    commit = "a" * 40
    model = tmp_path / "hub" / "models--owner--vlm"
    (model / "refs").mkdir(parents=True)
    (model / "refs" / "main").write_text(commit)
    (model / "snapshots" / commit).mkdir(parents=True)
    (model / "snapshots" / commit / "config.json").write_text("{}")
    (model / "snapshots" / commit / "model.safetensors").write_bytes(b"")  # a snapshot is whole with its weights
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_hub_revision("owner/vlm", None) == commit
    with pytest.raises(ConfigError, match=r"not in the HF cache .*run `hf download owner/other"):
        resolve_hub_revision("owner/other", None)


# --------------------------------------------------------------------------------------------------------------------
# mlflow run … --backend med-idefics-slurm


def _mlproject_repo(tmp_path: Path, repo_root: Path) -> Path:
    repo = tmp_path / "project"
    repo.mkdir()
    for name in ("MLproject", "conda.yaml", "params.yaml"):
        (repo / name).write_text((repo_root / name).read_text())
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"], cwd=repo, check=True)
    (repo / "backend.json").write_text('{"set": ["cluster.slurm.sqlite_single_node=true"]}')
    return repo


def test_an_entry_point_runs_as_a_slurm_job_and_its_run_follows_the_job(slurm, tmp_path, repo_root):
    """`promote` (an empty registry: a quick no-candidate decision): FINISHED, tagged with its job id; `predict` with
    no champion to load (and no image): the job fails and so does the run."""
    repo = _mlproject_repo(tmp_path, repo_root)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    backend = ["--backend", "med-idefics-slurm", "--backend-config", "backend.json", "--env-manager", "local"]
    done = subprocess.run(
        [str(BIN / "mlflow"), "run", ".", "-e", "promote", *backend], cwd=repo, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]  # submitted: `mlflow run` does not wait
    run = _entry_point_run("promote")
    assert run.info.status in ("SCHEDULED", "RUNNING", "FINISHED") and run.data.tags["slurm_job_id"].isdigit()
    job_id = run.data.tags["slurm_job_id"]
    _wait_for(lambda: slurm_state(job_id) == "COMPLETED", 90, "the promote job")
    assert _entry_point_run("promote").info.status == "FINISHED"
    subprocess.run(
        [str(BIN / "mlflow"), "run", ".", "-e", "predict", "-P", "image=params.yaml", "-P", "question=q", *backend],
        cwd=repo, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job_id = _entry_point_run("predict").data.tags["slurm_job_id"]
    _wait_for(lambda: slurm_state(job_id) == "FAILED", 90, "the predict job to fail")
    assert _entry_point_run("predict").info.status == "FAILED"


def _entry_point_run(entry_point: str):
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name("med-idefics").experiment_id
    (run,) = client.search_runs([experiment], f"tags.`mlflow.project.entryPoint` = '{entry_point}'")
    return run


def test_a_cancelled_entry_point_job_leaves_its_run_killed_not_running(slurm, tmp_path, repo_root, monkeypatch):
    import mlflow

    repo = _mlproject_repo(tmp_path, repo_root)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    submitted = mlflow.projects.run(
        str(repo), "promote", backend="med-idefics-slurm", backend_config=str(repo / "backend.json"),
        env_manager="local", synchronous=False,
    )  # fmt: skip
    job_id = mlflow.MlflowClient().get_run(submitted.run_id).data.tags["slurm_job_id"]
    submitted.cancel()
    _wait_for(lambda: slurm_state(job_id) == "CANCELLED", 30, "the job to be cancelled")
    assert mlflow.MlflowClient().get_run(submitted.run_id).info.status == "KILLED"


# --------------------------------------------------------------------------------------------------------------------
# Seeds


def test_each_seed_is_an_experiment_of_its_own_pinned_to_the_store(repo_root, tmp_path, monkeypatch):
    from med_idefics.workflow import seeds

    monkeypatch.chdir(repo_root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    params = load_params(repo_root / "params.yaml")
    printed = []
    seeds.run_seeds(
        [7, 2026], params, ["sweep.sizes=[]"], slurm=True, dry_run=True, log_dir=tmp_path, echo=printed.append
    )
    assert len(printed) == 2
    for seed, script in zip((7, 2026), printed, strict=True):
        assert f"#SBATCH --job-name=med-idefics:seed-{seed}" in script and "#SBATCH --time=120" in script
        assert (
            f"-m dvc exp run --temp -n seed-{seed} -S seed={seed} -S mlflow.tracking_uri=http://mlflow.example:5000 "
            "-S 'sweep.sizes=[]'" in script
        )
    queued = []
    seeds.run_seeds([7], params, [], dry_run=True, echo=queued.append)  # without --slurm: queued for dvc queue start
    assert queued[0].endswith(
        "dvc exp run --queue -n seed-7 -S seed=7 -S mlflow.tracking_uri=http://mlflow.example:5000"
    )
    with pytest.raises(ConfigError, match="each seed once"):
        seeds.run_seeds([7, 7], params, [], dry_run=True, echo=queued.append)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://me:secret@mlflow.example:5000")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_PASSWORD"):
        seeds.run_seeds([7], params, [], slurm=True, dry_run=True, echo=queued.append)


def test_ctrl_c_while_following_cancels_what_was_submitted(slurm, tmp_path, monkeypatch):
    """`repro --slurm --wait`, interrupted: the running stage gets SIGTERM, the one waiting on it is cancelled."""
    repo = _standin_repo(tmp_path, {"t": ("train", "checkpoint", []), "u": ("report", "ok", ["t"])})
    monkeypatch.chdir(repo)
    monkeypatch.setattr(cluster, "POLL_SECONDS", 0.5)
    real_sleep = time.sleep

    def interrupt_once_running(seconds):
        if (repo / "t.ready").exists():
            raise KeyboardInterrupt
        real_sleep(seconds)

    printed = []
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(cluster, "time", SimpleNamespace(monotonic=time.monotonic, sleep=interrupt_once_running))
        cluster.repro_slurm(cluster.cluster_params([]), wait=True, echo=printed.append)
    assert any(line.endswith(")") and "cancelling t, u (jobs" in line for line in printed), printed
    _wait_for((repo / "t.SIGTERM").exists, 30, "the running stage to get SIGTERM")
    ids = [line.split("job ")[1].split(",")[0] for line in printed if line.startswith("submitted")]
    _wait_for(lambda: all(slurm_state(i) == "CANCELLED" for i in ids), 30, "both jobs to be cancelled")


@pytest.mark.slow
def test_a_stage_over_its_time_limit_names_the_key_to_raise(slurm, tmp_path, monkeypatch):
    """A stage that runs past `cluster.slurm.<kind>.minutes` (1 minute here; Slurm ends it within a minute more)."""
    repo = _standin_repo(tmp_path, {"t": ("evaluate", "checkpoint", [])})  # waits for a signal that never comes
    monkeypatch.chdir(repo)
    monkeypatch.setattr(cluster, "POLL_SECONDS", 2)
    result = CliRunner().invoke(main, ["repro", "--slurm", "--wait", "--set", "cluster.slurm.evaluate.minutes=1"])
    assert result.exit_code == 1
    assert "stage t ran past its time limit: raise cluster.slurm.evaluate.minutes" in result.output


@pytest.mark.parametrize(
    ("state", "says"),
    [
        (slurm.JobState("TIMEOUT"), "raise cluster.slurm.train.minutes"),
        (slurm.JobState("OUT_OF_MEMORY"), "raise cluster.slurm.train.mem"),
        (slurm.JobState("CANCELLED", "DependencyNeverSatisfied"), "a stage it depends on failed"),
        (slurm.JobState("NODE_FAIL"), "the cluster, not the stage"),
        (slurm.JobState("UNKNOWN"), "Slurm no longer knows the job"),
        (slurm.JobState("FAILED", "NonZeroExitCode"), "its log /l/stage1.log says why"),
    ],
)
def test_each_way_a_job_ends_says_what_to_do(state, says):
    assert says in slurm.failure("stage1", "train", state, Path("/l/stage1.log"))


def test_a_second_submission_waits_for_the_first_ones_jobs(slurm, tmp_path, monkeypatch):
    repo = _standin_repo(tmp_path, {"t": ("train", "checkpoint", [])})
    monkeypatch.chdir(repo)
    (job_id,) = cluster.repro_slurm(cluster.cluster_params([]), echo=lambda _: None)
    with pytest.raises(cluster.SlurmError, match=rf"still queued or running \(t {job_id}\).*scancel {job_id}"):
        cluster.repro_slurm(cluster.cluster_params([]), echo=lambda _: None)
