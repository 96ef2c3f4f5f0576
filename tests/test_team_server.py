"""A lab's setup, for real: an `mlflow server` with proxied artifacts (`--artifacts-destination`) on PostgreSQL where
the machine has it (PostgreSQL binaries and the `team` extra's driver), else on sqlite — the warnings summary says
which — started on free localhost ports by the test and stopped at its end. Against it: a training stage, `evaluate`,
`register`, `promote`, loading by version and by alias from a directory with no checkout, `mlflow models serve`
answering, and two `promote` processes at once. No artifact or model-version source may point at a local path, and
nothing may be written to the project's own store."""

from __future__ import annotations

import base64
import contextlib
import glob
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from med_idefics.cli import main
from med_idefics.config import load_params
from med_idefics.stages.register import VERSION_TAGS, version_metrics
from med_idefics.tracking import registry
from med_idefics.tracking.runs import seeded_run_name

BIN = Path(sys.executable).parent
NAME = "med-idefics-vqa"
REMOTE = ("mlflow-artifacts:", "models:/m-")  # a proxied-artifact server's places (models:/m-… a logged model's)


class TeamServerBackend(UserWarning):
    """Says which database the team-server tests ran on."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


@contextlib.contextmanager
def _postgres(bin_dir: Path) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free port (as user `postgres` when we are root: it refuses root)."""
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="med-idefics-pg-"))
    if as_postgres:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", _free_port()

    def pg(*args: str) -> None:
        subprocess.run([*as_postgres, *args], check=True, capture_output=True, timeout=120)

    try:
        pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
        try:
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
        finally:
            pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for(url: str, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{process.args[:3]} exited with {process.returncode}"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


@contextlib.contextmanager
def _process(command: list[str], log: Path, **kwargs) -> Iterator[subprocess.Popen]:
    """A server process in its own process group, stopped (with its workers) at the end."""
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def team_server(tmp_path_factory) -> Iterator[str]:
    """The server's URL. PostgreSQL needs its binaries and psycopg2 (`pip install -e .[team]`)."""
    folder = tmp_path_factory.mktemp("team-server")
    pg_bin, driver = _postgres_bin(), importlib.util.find_spec("psycopg2") is not None
    with contextlib.ExitStack() as stack:
        if pg_bin is not None and driver:
            backend = stack.enter_context(_postgres(pg_bin))
            warnings.warn(TeamServerBackend(f"team server tests ran on PostgreSQL ({pg_bin})"), stacklevel=1)
        else:
            backend = f"sqlite:///{folder / 'server.db'}"
            why = "no PostgreSQL binaries" if pg_bin is None else "no psycopg2 (pip install -e .[team])"
            warnings.warn(TeamServerBackend(f"team server tests ran on sqlite: {why}"), stacklevel=1)
        port = _free_port()
        command = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend, "--artifacts-destination",
                   str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
        server = stack.enter_context(_process(command, folder / "server.log"))
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_for(f"{url}/health", server, 120)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{(folder / 'server.log').read_text()[-3000:]}") from err
        yield url


@pytest.fixture
def team_project(project, team_server, monkeypatch) -> Path:
    """The tmp project (tiny recipes and data), committed to git, logging to the team server."""
    import mlflow

    for args in (
        ["init", "-q"],
        ["add", "params.yaml"],
        ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "p"],
    ):
        subprocess.run(["git", *args], cwd=project, check=True, capture_output=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server)
    mlflow.set_tracking_uri(team_server)
    return project


# What a blank suite's scores say of a model that looks at the image: what promotion's image gate passes
LOOKS = {"image_reliance": 0.3, "image_reliance_ci_low": 0.2, "image_reliance_ci_high": 0.4, "image_reliance_p": 1e-4}


def _cli(*argv: str) -> str:
    result = CliRunner().invoke(main, list(argv))
    assert result.exit_code == 0, f"med-idefics {' '.join(argv)}: {result.output}\n{result.exception!r}"
    return result.stdout


def _subprocess(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command[:3]}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done


def test_a_team_works_against_a_tracking_server(team_project, team_server, tmp_path_factory, make_vqa_records):
    project, client = team_project, MlflowClient()
    env = os.environ | {"MLFLOW_TRACKING_URI": team_server, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

    _cli("train", "single-stage", "--out", "outputs/single-stage")
    _cli("evaluate", "--variant", "single-stage", "--suite", "validation,validation-blank,vqa-rad")
    # A few training steps do not teach a tiny model to look at the image; this test is about the server, so the
    # version carries the validation-blank scores of one that does (promotion's image gate: tests/test_registry.py)
    blank = project / "metrics/single-stage/validation-blank.json"
    blank.write_text(json.dumps(json.loads(blank.read_text()) | LOOKS))
    assert "single-stage → med-idefics-vqa version 1 (new)" in _cli("register", "--variant", "single-stage")
    promoted = _cli("promote")
    assert "promoted by rule no-champion:" in promoted, promoted

    # Everything is on the server: run artifacts, logged models and versions; nothing in the project's own store.
    experiment = client.get_experiment_by_name("med-idefics")
    runs = client.search_runs([experiment.experiment_id])
    training = seeded_run_name("single-stage", load_params("params.yaml").seed)
    assert {training, "eval-single-stage-validation", "register-single-stage", "promote"} <= {
        r.info.run_name for r in runs
    }
    assert all(r.info.artifact_uri.startswith(REMOTE) for r in runs), [r.info.artifact_uri for r in runs]
    (version,) = client.search_model_versions(f"name = '{NAME}'")
    assert version.source.startswith(REMOTE), version.source
    model = client.get_logged_model(version.source.removeprefix("models:/"))  # the version's logged model
    assert model.artifact_location.startswith(REMOTE), model.artifact_location
    assert not [p for p in ("mlflow.db", "mlartifacts", "mlruns") if (project / p).exists()]
    assert version.tags["git_dirty"] == "false" and version.tags["dvc_exp_name"] == "none"
    # Its scores on its logged model, through the server: what the registry pages and promotion read
    promotion = {"promotion.status", "promotion.outcome", "promotion.rule", "promotion.p_value", "promotion.run_id"}
    assert len(version.tags) <= 15 and set(version.tags) <= {*VERSION_TAGS, *promotion}, sorted(version.tags)
    evidence = registry.evidence(client, version)
    validation = json.loads((project / "metrics/single-stage/validation.json").read_text())
    assert evidence.value("validation", "closed_accuracy_strict") == round(validation["closed_accuracy_strict"], 4)
    evaluations = {r.info.run_name: r.info.run_id for r in runs}
    assert evidence.eval_runs["validation"] == evaluations["eval-single-stage-validation"]
    assert client.get_run(version.run_id).data.metrics == {m.key: m.value for m in model.metrics}

    # From a directory with no checkout: by alias through the CLI (another process), by version in Python.
    nowhere = tmp_path_factory.mktemp("no-checkout")
    image = nowhere / "scan.png"
    image.write_bytes(make_vqa_records([("Is there a lesion?", "yes")])[0]["image"])
    by_alias = _subprocess([str(BIN / "med-idefics"), "predict", "--model", f"models:/{NAME}@champion", "--image",
                            str(image), "--question", "Is there a lesion?"], nowhere, env).stdout.strip()  # fmt: skip
    os.chdir(nowhere)
    try:
        import mlflow
        import pandas as pd

        frame = pd.DataFrame({"image": [str(image)], "question": ["Is there a lesion?"]})
        by_version = mlflow.pyfunc.load_model(f"models:/{NAME}/{version.version}").predict(frame)["answer"].iloc[0]
    finally:
        os.chdir(project)
    assert by_alias == by_version and list(nowhere.iterdir()) == [image]

    # `mlflow models serve` on the alias answers over REST, and refuses a bad image with a 400 naming the row.
    port = _free_port()
    serve = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    with _process(serve, nowhere.parent / "serve.log", cwd=nowhere, env=env) as server:
        try:
            _wait_for(f"http://127.0.0.1:{port}/ping", server, 180)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{(nowhere.parent / 'serve.log').read_text()[-3000:]}") from err
        encoded = base64.b64encode(image.read_bytes()).decode()
        status, body = _invoke(port, [[encoded, "Is there a lesion?"]])
        assert status == 200 and body["predictions"][0]["answer"] == by_alias, body
        status, body = _invoke(port, [["bm90IGFuIGltYWdl", "Is there a lesion?"]])
        assert status == 400 and "row 0" in body["message"], body

    # Two `promote` processes at once, on a registered model of their own (40 paired validation questions each):
    # both leave the alias on the version the rules choose — the significantly better one, not the uncommitted one.
    other = "concurrency-check"
    committed = {"git_commit": "0123abc", "git_dirty": "false", "dvc_exp_name": "none"}
    champion = _version_on(client, other, 20, committed)
    _cli("promote", "--set", f"registry.model_name={other}")
    better = _version_on(client, other, 38, committed)
    _version_on(client, other, 40, committed | {"dvc_exp_name": "queued-lr", "git_dirty": "true"})
    promote = [str(BIN / "med-idefics"), "promote", "--set", f"registry.model_name={other}"]
    processes = [subprocess.Popen(promote, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]  # fmt: skip
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert str(client.get_model_version_by_alias(other, "champion").version) == better != champion
    for stdout, _ in outputs:  # each saw the champion before the other moved it, or after: either way the same end
        assert f"(champion → {better})" in stdout and (
            "rule significant" in stdout or "rule already-champion" in stdout
        )


def _version_on(client: MlflowClient, name: str, right: int, provenance: dict[str, str]) -> str:
    """A version of ``name`` whose validation evaluation answered ``right`` of 40 closed questions right — the first
    ``right`` ones, so that versions pair — logged to the server as an evaluation run; its evidence on a logged model
    of its own (no weights: promotion never loads one), as `register` leaves it."""
    import mlflow

    from med_idefics.scoring.predictions import write_predictions

    rows = [{"id": f"q{i}", "question": f"is {i} there?", "answer": "yes", "answer_type": "closed",
             "prediction": "yes" if i < right else "no", "raw_generation": ""} for i in range(40)]  # fmt: skip
    with mlflow.start_run(run_name=f"eval-{name}-{right}") as run, tempfile.TemporaryDirectory() as folder:
        mlflow.log_artifact(str(write_predictions(Path(folder) / "validation.jsonl", rows)), "predictions")
    with contextlib.suppress(mlflow.exceptions.MlflowException):  # already there
        client.create_registered_model(name)
    model = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run.info.run_id)
    tags = {"variant": "two-stage", **provenance}
    source, model_id = f"models:/{model.model_id}", model.model_id
    version = client.create_model_version(name, source, run.info.run_id, tags, model_id=model_id)
    metrics = version_metrics({"validation": {"closed_accuracy_strict": right / 40}}, load_params("params.yaml"))
    registry.log_evidence(client, run.info.run_id, model.model_id, metrics, {"validation": run.info.run_id})
    blank = {"closed_with_image": right / 40, "closed_accuracy_strict": right / 80, **LOOKS}
    client.log_dict(run.info.run_id, blank, f"{registry.EVALUATION_ARTIFACTS}/validation-blank.json")
    return str(version.version)


def _invoke(port: int, rows: list[list[str]]) -> tuple[int, dict]:
    data = json.dumps({"dataframe_split": {"columns": ["image", "question"], "data": rows}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
