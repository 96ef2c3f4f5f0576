"""MLflow tracking: where runs go, what they record (and never record), and how they end — including SIGKILL."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from med_idefics.config import ConfigError, load_params
from med_idefics.tracking.provenance import scrub_secrets
from med_idefics.tracking.runs import (
    MAX_PARAM_LENGTH,
    OTHER_COLORS,
    RUN_COLOR_TAG,
    RunTerminated,
    end_stale_runs,
    is_main_process,
    log_params,
    log_split_inputs,
    seeded_run_name,
    tracked_run,
    variant_color,
)
from med_idefics.tracking.store import EXPERIMENT_KIND_TAG, resolve_tracking_uri, setup_tracking

FAKE_TOKEN = "hf_FAKEtoken123456"
ENV_VARS = ["MLFLOW_TRACKING_URI", "RANK", "LOCAL_RANK", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME"]
ENV_VARS += ["DVC_EXP_BASELINE_REV", "HF_TOKEN"]


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow sqlite store; copying it saves each test the ~4 s of schema migrations."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No inherited tracking URI, rank or DVC context; the cwd is a tmp dir: the default store is never the repo's."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    yield
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def store(tmp_path, template_db, monkeypatch) -> Path:
    """A fresh store in tmp_path/store, selected through $MLFLOW_TRACKING_URI (and for this test's own clients)."""
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(template_db, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    return db


@pytest.fixture
def params(repo_root):
    return load_params(repo_root / "params.yaml")


def finished(run_id: str):
    return MlflowClient().get_run(run_id)


def test_params_and_config_are_logged(store, params):
    with tracked_run(params, "stage1") as run:
        pass
    logged = finished(run.info.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "stage1"
    assert logged.data.params["stage1.lr"] == str(params.stage1.lr)
    assert logged.data.params["lora.target_modules"] == params.lora.target_modules
    assert logged.data.params["sweep.sizes"] == str(params.sweep.sizes)
    assert set(logged.data.params) == set(params.flat())
    config = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="config.yaml"))
    assert yaml.safe_load(config.read_text()) == params.to_dict()
    assert logged.info.artifact_uri.startswith(str(store.parent / "mlartifacts"))  # artifacts beside the sqlite db


def test_a_runs_variant_is_a_param_and_its_name_says_the_seed(store, params):
    """The compare page's "show diff only" lists params: the variant must be one (it is a tag too); a variant's run
    is named with the seed, so that two seeds' rows and chart bars can be told apart."""
    with tracked_run(params, seeded_run_name("two-stage", params.seed), tags={"variant": "two-stage"}) as run:
        pass
    logged = finished(run.info.run_id)
    assert logged.info.run_name == "two-stage (seed 42)" == seeded_run_name("two-stage", 42)
    assert (logged.data.params["variant"], logged.data.params["seed"]) == ("two-stage", "42")
    assert logged.data.tags["variant"] == "two-stage"
    assert logged.data.tags[RUN_COLOR_TAG] == variant_color("two-stage") == "#2ca02c"  # Figure 2's two-stage green
    sweep = {variant_color(f"two-stage-n{n}") for n in (100, 500, 1000)}
    assert sweep <= set(OTHER_COLORS) and variant_color("two-stage-n100") == variant_color("two-stage-n100")


def test_long_param_values_are_cut_to_mlflow_limit(store, params):
    params.lora.target_modules = "x" * (MAX_PARAM_LENGTH + 500)
    with tracked_run(params, "long") as run:
        pass
    value = finished(run.info.run_id).data.params["lora.target_modules"]
    assert len(value) == MAX_PARAM_LENGTH
    assert value.endswith("[truncated]")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_provenance_tags_in_the_repository(store, params, repo_root, monkeypatch):
    head = subprocess.run(["git", "-C", str(repo_root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the checkout is not a git repository")
    dirty = subprocess.run(
        ["git", "-C", str(repo_root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    monkeypatch.chdir(repo_root / "src")  # the root is found from a subdirectory
    with tracked_run(params, "provenance", tags={"variant": "s1"}) as run:
        pass
    tags = finished(run.info.run_id).data.tags
    assert tags["git_commit"] == head.stdout.strip()
    assert tags["git_dirty"] == str(bool(dirty)).lower()
    assert tags["profile"] == params.profile
    assert tags["host"] == socket.gethostname()
    assert tags["pid"] == str(os.getpid())
    assert tags["variant"] == "s1"
    assert tags["dvc_stage"] == "none"


def test_data_version_and_dvc_context_tags(store, params, tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / "sub").mkdir(parents=True)
    (root / "params.yaml").write_text("profile: demo\n")
    (root / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef.dir\n  size: 10\n  nfiles: 2\n  path: data\n")
    monkeypatch.chdir(root / "sub")
    monkeypatch.setenv("DVC_STAGE", "train_stage1")
    monkeypatch.setenv("DVC_EXP_NAME", "lucid-lamb")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    with tracked_run(params, "from-env") as run:
        pass
    tags = finished(run.info.run_id).data.tags
    assert tags["data_md5"] == "0123456789abcdef.dir"
    assert tags["dvc_stage"] == "train_stage1"
    assert tags["dvc_exp_name"] == "lucid-lamb"
    assert tags["dvc_exp_baseline_rev"] == "abc123"

    (root / "data.dvc").unlink()
    with tracked_run(params, "explicit", dvc_stage="stage2") as run:
        pass
    tags = finished(run.info.run_id).data.tags
    assert tags["data_md5"] == "none"
    assert tags["dvc_stage"] == "stage2"  # the argument wins over $DVC_STAGE


def test_exception_ends_failed_with_error_tag(store, params):
    with pytest.raises(ValueError, match="boom"), tracked_run(params, "fails") as run:
        raise ValueError("boom")
    logged = finished(run.info.run_id)
    assert logged.info.status == "FAILED"
    assert logged.data.tags["error"] == "ValueError: boom"
    assert mlflow.active_run() is None


def test_keyboard_interrupt_ends_killed(store, params):
    with pytest.raises(KeyboardInterrupt), tracked_run(params, "interrupted") as run:
        raise KeyboardInterrupt
    logged = finished(run.info.run_id)
    assert logged.info.status == "KILLED"
    assert logged.data.tags["killed_by"] == "KeyboardInterrupt"


def test_sigterm_ends_killed_and_restores_the_handler(store, params):
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunTerminated) as caught, tracked_run(params, "terminated") as run:
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()  # the handler raises before this returns
    assert caught.value.code == 128 + signal.SIGTERM
    logged = finished(run.info.run_id)
    assert logged.info.status == "KILLED"
    assert logged.data.tags["killed_by"] == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is previous


def test_nested_run_records_its_parent(store, params):
    with tracked_run(params, "sweep") as parent, tracked_run(params, "size-500", nested=True) as child:
        pass
    assert finished(child.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert {finished(r.info.run_id).info.status for r in (parent, child)} == {"FINISHED"}


SIGKILLED_CHILD = """
import sys, time
from med_idefics.config import load_params
from med_idefics.tracking.runs import tracked_run
with tracked_run(load_params(sys.argv[1]), "doomed") as run:
    print(run.info.run_id, flush=True)
    time.sleep(120)
"""


def test_sigkilled_run_is_marked_killed_by_the_next_run(store, params, repo_root):
    child = subprocess.Popen(
        [sys.executable, "-c", SIGKILLED_CHILD, str(repo_root / "params.yaml")],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),  # carries MLFLOW_TRACKING_URI of the tmp store
    )
    try:
        ready, _, _ = select.select([child.stdout], [], [], 60)
        doomed_id = child.stdout.readline().strip() if ready else ""
    finally:
        child.kill()
        child.wait()
    assert doomed_id, "the child process never started its run"
    assert finished(doomed_id).info.status == "RUNNING"  # nobody could end it

    with tracked_run(params, "next") as run:
        pass
    doomed = finished(doomed_id)
    assert doomed.info.status == "KILLED"
    assert doomed.data.tags["killed_by"] == f"sigkill-or-crash, detected by run {run.info.run_id}"
    assert finished(run.info.run_id).info.status == "FINISHED"


def test_only_dead_processes_of_this_host_are_swept(store, params):
    experiment_id = setup_tracking(params)
    client = MlflowClient()
    gone = _dead_pid()

    def running(host: str, pid: int) -> str:
        return client.create_run(experiment_id, tags={"host": host, "pid": str(pid)}).info.run_id

    alive_here = running(socket.gethostname(), os.getpid())
    dead_elsewhere = running("another-host", gone)
    dead_here = running(socket.gethostname(), gone)
    assert end_stale_runs(experiment_id) == [dead_here]
    assert client.get_run(dead_here).info.status == "KILLED"
    assert client.get_run(dead_here).data.tags["killed_by"] == "sigkill-or-crash, detected by end_stale_runs"
    assert {client.get_run(r).info.status for r in (alive_here, dead_elsewhere)} == {"RUNNING"}


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.parametrize(
    ("env", "main"),
    [({}, True), ({"RANK": "0", "LOCAL_RANK": "0"}, True), ({"RANK": "1", "LOCAL_RANK": "1"}, False),
     ({"LOCAL_RANK": "2"}, False), ({"RANK": "3", "LOCAL_RANK": "0"}, False)],
)  # fmt: skip
def test_is_main_process(env, main, monkeypatch):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert is_main_process() is main


def test_non_main_rank_logs_nothing(params, tmp_path, monkeypatch):
    db = tmp_path / "rank1" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("RANK", "1")
    with tracked_run(params, "rank1") as run:
        assert run is None
        assert mlflow.active_run() is None
    assert not db.parent.exists()


def test_tracking_uri_precedence(params, tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / "deep" / "er").mkdir(parents=True)
    (root / "params.yaml").write_text("profile: demo\n")
    monkeypatch.chdir(root / "deep" / "er")
    assert resolve_tracking_uri(params) == f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", str(root))  # dvc repro: DVC names the repository the stage runs in
    assert resolve_tracking_uri(params) == f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/from-env.db")
    assert resolve_tracking_uri(params) == "sqlite:////elsewhere/from-env.db"
    params.mlflow.tracking_uri = "http://tracking.example:5000"
    assert resolve_tracking_uri(params) == "http://tracking.example:5000"


def test_a_relative_sqlite_uri_is_anchored_at_the_repository_root(params, tmp_path, monkeypatch):
    """`sqlite:///mlflow.db` (the docs' form) names the repository's store from any directory, never the cwd's."""
    root = tmp_path / "project"
    (root / "sub").mkdir(parents=True)
    (root / "params.yaml").write_text("profile: demo\n")
    monkeypatch.chdir(root / "sub")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    assert resolve_tracking_uri(params) == f"sqlite:///{root / 'mlflow.db'}"
    params.mlflow.tracking_uri = "sqlite:///stores/team.db?timeout=30"
    assert resolve_tracking_uri(params) == f"sqlite:///{root / 'stores/team.db'}?timeout=30"
    for unchanged in ("sqlite:////abs/mlflow.db", "sqlite:///:memory:", "postgresql+psycopg2://u@h/db"):
        params.mlflow.tracking_uri = unchanged
        assert resolve_tracking_uri(params) == unchanged


def test_an_experiment_copy_uses_only_the_store_pinned_in_its_params(params, tmp_path, monkeypatch):
    """A queued (or --temp) DVC experiment runs in a copy whose environment is `dvc queue start`'s, not the one it
    was queued in: unless its params pin the store, it refuses to start and says how to pin it."""
    repo, copy = tmp_path / "repo", tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc"
    copy.mkdir(parents=True)
    (repo / "params.yaml").write_text("profile: demo\n")
    (copy / "params.yaml").write_text("profile: demo\n")
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    with pytest.raises(ConfigError, match=r"-S mlflow\.tracking_uri=sqlite:///mlflow\.db"):
        resolve_tracking_uri(params)  # queued without a store in mind: the default one, but it must be said
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team:5000")
    with pytest.raises(ConfigError, match=r"dvc queue start.*-S mlflow\.tracking_uri=http://team:5000"):
        resolve_tracking_uri(params)
    params.mlflow.tracking_uri = "sqlite:///mlflow.db"  # pinned when queued: the repository's store, not the copy's
    assert resolve_tracking_uri(params) == f"sqlite:///{repo / 'mlflow.db'}"
    params.mlflow.tracking_uri = "http://team:5000"
    assert resolve_tracking_uri(params) == "http://team:5000"


def test_default_store_and_artifacts_sit_at_the_repo_root(params, tmp_path, template_db, monkeypatch):
    root = tmp_path / "project"
    (root / "sub").mkdir(parents=True)
    (root / ".dvc").mkdir()
    shutil.copy(template_db, root / "mlflow.db")
    monkeypatch.chdir(root / "sub")
    experiment = mlflow.get_experiment(setup_tracking(params))
    assert mlflow.get_tracking_uri() == f"sqlite:///{root / 'mlflow.db'}"
    assert experiment.name == params.mlflow.experiment
    assert Path(experiment.artifact_location.removeprefix("file://")) == root / "mlartifacts"
    assert setup_tracking(params) == experiment.experiment_id  # found again, not created twice


def test_deleted_experiment_is_a_config_error(store, params):
    MlflowClient().delete_experiment(setup_tracking(params))
    with pytest.raises(ConfigError, match=r"mlflow\.experiment 'med-idefics' is deleted"):
        setup_tracking(params)


def test_the_experiment_is_tagged_as_model_training(store, params):
    """MLflow 3's UI opens an experiment by its kind: ours is model training (runs), not GenAI (traces)."""
    experiment_id = setup_tracking(params)
    assert MlflowClient().get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    MlflowClient().set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "genai_development")  # e.g. the UI's guess
    assert setup_tracking(params) == experiment_id
    assert MlflowClient().get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_splits_are_logged_as_dataset_inputs_with_their_file_md5(store, params, tmp_path, make_vqa_records):
    import hashlib

    from med_idefics.data.schema import write_splits

    paths = write_splits(tmp_path / "data", "syn", {"train": make_vqa_records([("Is it?", "yes")] * 3)})
    with tracked_run(params, "inputs") as run:
        log_split_inputs(tmp_path / "data", [("syn", "train")], "training")
        log_split_inputs(tmp_path / "data", [("syn", "train")], "training")  # twice: still one input
    (logged,) = finished(run.info.run_id).inputs.dataset_inputs
    assert logged.dataset.name == "syn/train"
    assert logged.dataset.digest == hashlib.md5(paths["train"].read_bytes()).hexdigest()
    assert json.loads(logged.dataset.source) == {"uri": str(tmp_path / "data" / "syn" / "train.parquet")}
    tags = {tag.key: tag.value for tag in logged.tags}
    assert tags == {"mlflow.data.context": "training", "dataset": "syn", "split": "train"}


def test_scrub_secrets_drops_secret_keys_and_values(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "s3cr3t-from-env")
    mapping = {
        "eval.max_new_tokens": 8,
        "tokenizer": "word-level",
        "HF_TOKEN": "anything",
        "hub": {"access_token": "x", "repo": "org/model", "api_key": "y"},
        "db_password": "pw",
        "model.revision": FAKE_TOKEN,
        "note": "uses s3cr3t-from-env here",
        "tracking": "https://user:pa55@tracking.example",
        "secretary": "kept: the word is not 'secret'",
    }
    assert scrub_secrets(mapping) == {
        "eval.max_new_tokens": 8,
        "tokenizer": "word-level",
        "hub": {"repo": "org/model"},
        "secretary": "kept: the word is not 'secret'",
    }


def test_no_secret_reaches_the_tracking_store(store, params, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("WANDB_API_KEY", "s3cr3t-from-env")
    params.model.revision = FAKE_TOKEN  # a token pasted into params.yaml by mistake
    tags = {"hub_token": FAKE_TOKEN, "note": "key s3cr3t-from-env", "variant": "s2"}
    with pytest.raises(RuntimeError), tracked_run(params, "secrets", tags=tags) as run:
        log_params({"hub.hf_token": FAKE_TOKEN, "login.password": "hunter2-long", "train_size": 500})
        raise RuntimeError(f"401 for token {FAKE_TOKEN}")
    logged = finished(run.info.run_id)
    assert logged.data.params["train_size"] == "500"  # the rest was logged
    assert logged.data.tags["variant"] == "s2"
    assert logged.data.tags["error"] == "RuntimeError: 401 for token [redacted]"
    assert "model.revision" not in logged.data.params

    files = [p for p in store.parent.rglob("*") if p.is_file()]
    assert store in files and any(p.name == "config.yaml" for p in files)
    for path in files:
        content = path.read_bytes()
        for secret in (FAKE_TOKEN, "s3cr3t-from-env", "hunter2-long"):
            assert secret.encode() not in content, f"{secret} leaked into {path}"


def test_tracking_uri_command_names_the_configured_store_and_make_demo_says_it(repo_root, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from med_idefics.cli import main

    root = tmp_path / "project"
    (root / "sub").mkdir(parents=True)
    shutil.copy(repo_root / "params.yaml", root / "params.yaml")
    monkeypatch.chdir(root / "sub")
    runner = CliRunner()
    for env, printed, ui in [
        ({}, f"sqlite:///{root / 'mlflow.db'}", f"mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}"),
        ({"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}, "http://127.0.0.1:5000", "http://127.0.0.1:5000 (the"),
    ]:
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        result = runner.invoke(main, ["tracking-uri", "--params", str(root / "params.yaml")])
        assert result.exit_code == 0 and result.stdout.strip() == printed, result.output
        result = runner.invoke(main, ["tracking-uri", "--ui", "--params", str(root / "params.yaml")])
        assert result.stdout.startswith(ui), result.output
    demo_recipe = (repo_root / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "$(med-idefics tracking-uri --ui)" in demo_recipe and "sqlite:///" not in demo_recipe


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_torn_read_of_dvc_lock_never_makes_pipeline_outputs_look_like_source_changes(tmp_path):
    """Under `repro --jobs` DVC rewrites dvc.lock in place while `register` reads it: a half-written lock must not
    make the outputs written since the commit count as uncommitted work (a demo's version was refused promotion so)."""
    import threading

    from med_idefics.tracking.provenance import git_dirty

    lock = yaml.safe_dump({"schema": "2.0", "stages": {f"s{i}": {"cmd": "x", "outs": [{"path": f"out/{i}.json"}]}
                                                        for i in range(40)}})  # fmt: skip

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "out").mkdir()
    for i in range(40):
        (tmp_path / "out" / f"{i}.json").write_text("{}")
    (tmp_path / "src.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "outputs, no lock yet")
    (tmp_path / "out" / "39.json").write_text('{"changed": true}')  # the last stage's output, rewritten
    (tmp_path / "dvc.lock").write_text(lock[: len(lock) // 2])  # torn: the later stages are missing
    threading.Timer(0.3, lambda: (tmp_path / "dvc.lock").write_text(lock)).start()
    assert git_dirty(tmp_path) == "false"  # the torn read is retried until DVC has written the whole lock
    git("add", "dvc.lock")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "the lock")
    (tmp_path / "out" / "39.json").write_text('{"changed": "again"}')
    (tmp_path / "dvc.lock").write_text(lock[: len(lock) // 3] + "\n")  # torn at a line end, parses as a mapping
    assert git_dirty(tmp_path) == "false"  # the committed lock still names the output
    (tmp_path / "src.py").write_text("x = 2\n")
    assert git_dirty(tmp_path) == "true"  # a real source change still counts
