"""`med-idefics repro --jobs N`: stages start only after the stages they depend on, at most N at once, a failure
stops what depends on it; and with real DVC, stages run side by side leave the same dvc.lock as `dvc repro`."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from med_idefics.workflow.pipeline import PipelineError, chain_lengths, oversubscription, run_pipeline, stage_graph

# A stand-in for the `dvc` executable: `… repro --single-item NAME` sleeps, appends its start and end to a journal
# and fails for the stage named in $FAIL; a plain `… repro` records the final check.
FAKE_DVC = """
import json, os, sys, time
journal = os.environ["JOURNAL"]
name = sys.argv[-1] if "--single-item" in sys.argv else "<dvc repro>"
start = time.monotonic()
time.sleep(float(os.environ.get("SLEEP", "0.4")))
with open(journal, "a") as handle:
    handle.write(json.dumps({"stage": name, "start": start, "end": time.monotonic(), "argv": sys.argv[1:],
                             "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n")
print(f"{name}: 100%|##########| 3/3")
sys.exit(3 if name == os.environ.get("FAIL") else 0)
"""

# base → (stage1 → stage2), single_stage; report needs both branches.
GRAPH = {
    "base": [],
    "stage1": ["base"],
    "stage2": ["stage1", "base"],
    "single_stage": ["base"],
    "report": ["stage2", "single_stage"],
}


@pytest.fixture
def fake_dvc(tmp_path, monkeypatch):
    script = tmp_path / "fake_dvc.py"
    script.write_text(FAKE_DVC)
    journal = tmp_path / "journal.jsonl"
    monkeypatch.setenv("JOURNAL", str(journal))

    def entries() -> list[dict]:
        return [json.loads(line) for line in journal.read_text().splitlines()]

    return (sys.executable, str(script)), entries


def test_the_longest_chain_after_a_stage_decides_what_starts_first():
    assert chain_lengths(GRAPH) == {"base": 4, "stage1": 3, "stage2": 2, "single_stage": 2, "report": 1}


def test_stages_start_after_their_dependencies_at_most_jobs_at_once_then_dvc_repro_checks(fake_dvc, tmp_path):
    dvc, entries = fake_dvc
    lines: list[str] = []
    run_pipeline(2, tmp_path / "logs", GRAPH, dvc, echo=lines.append)

    runs = entries()
    by_stage = {e["stage"]: e for e in runs}
    assert [e["stage"] for e in runs][-1] == "<dvc repro>" and by_stage["<dvc repro>"]["argv"] == ["repro"]
    assert set(by_stage) == set(GRAPH) | {"<dvc repro>"}
    for name, deps in GRAPH.items():
        assert by_stage[name]["argv"] == ["--wait-for-lock", "repro", "--single-item", name]
        for dep in deps:
            assert by_stage[dep]["end"] <= by_stage[name]["start"], f"{name} started before {dep} ended"
    overlapping = [
        (a, b)
        for a in GRAPH
        for b in GRAPH
        if a < b and by_stage[a]["start"] < by_stage[b]["end"] and by_stage[b]["start"] < by_stage[a]["end"]
    ]
    assert overlapping == [("single_stage", "stage1")]  # the only independent pair, and it ran side by side
    assert (tmp_path / "logs" / "stage1.log").read_text().startswith("stage1: 100%")
    assert any(re.search(r"done stage1 in \d+ s$", line) for line in lines)


def test_one_job_runs_the_stages_one_after_another(fake_dvc, tmp_path, monkeypatch):
    dvc, entries = fake_dvc
    monkeypatch.setenv("SLEEP", "0.1")
    run_pipeline(1, tmp_path / "logs", GRAPH, dvc, echo=lambda _: None)
    runs = sorted(entries(), key=lambda e: e["start"])
    assert all(a["end"] <= b["start"] for a, b in itertools.pairwise(runs))
    assert [e["stage"] for e in runs[:2]] == ["base", "stage1"]  # the longer chain first


def test_a_failed_stage_stops_its_dependents_and_names_its_log(fake_dvc, tmp_path, monkeypatch):
    dvc, entries = fake_dvc
    monkeypatch.setenv("FAIL", "stage1")
    lines: list[str] = []
    with pytest.raises(PipelineError, match=r"stage stage1 failed \(log: .*stage1\.log\)"):
        run_pipeline(2, tmp_path / "logs", GRAPH, dvc, echo=lines.append)
    ran = {e["stage"] for e in entries()}
    assert ran == {"base", "stage1", "single_stage"}  # single_stage was already running: it finished
    assert any("FAILED stage1 (exit 3" in line for line in lines)
    assert "stage1: 100%" in "\n".join(lines)  # the end of its log is shown


def test_sigterm_interrupts_the_running_stage_as_a_ctrl_c_would(fake_dvc, tmp_path, monkeypatch):
    """A stopped runner leaves no stage running on unattended (a stage's MLflow run then ends KILLED)."""
    dvc, _ = fake_dvc
    monkeypatch.setenv("SLEEP", "30")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from med_idefics.workflow.pipeline import run_pipeline\n"
        f"run_pipeline(2, Path({str(tmp_path / 'logs')!r}), {GRAPH!r}, {dvc!r})\n"
    )
    runner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    log = tmp_path / "logs" / "base.log"
    deadline = time.monotonic() + 30
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # the fake stage is asleep now
    runner.send_signal(signal.SIGTERM)
    out, _ = runner.communicate(timeout=30)
    assert runner.returncode == 128 + signal.SIGTERM
    assert "stopping base" in out
    assert not (tmp_path / "journal.jsonl").exists()  # base never finished its sleep, and nothing else started
    assert "KeyboardInterrupt" in log.read_text()  # interrupted as a Ctrl-C would


def test_on_a_gpu_machine_each_running_stage_has_a_gpu_of_its_own(fake_dvc, tmp_path):
    """`--jobs 3` with 2 GPUs: every stage sees one GPU (CUDA_VISIBLE_DEVICES), two stages running at once never
    share one, and no more stages run at once than there are GPUs (two 8B trainings do not fit on one)."""
    dvc, entries = fake_dvc
    graph = {"base": [], "a": ["base"], "b": ["base"], "c": ["base"], "d": ["a", "b", "c"]}
    lines: list[str] = []
    run_pipeline(3, tmp_path / "logs", graph, dvc, echo=lines.append, gpus=["0", "1"])
    runs = [e for e in entries() if e["stage"] != "<dvc repro>"]
    assert {e["gpu"] for e in runs} == {"0", "1"} and all(e["gpu"] in ("0", "1") for e in runs)
    for a, b in itertools.combinations(runs, 2):
        if a["start"] < b["end"] and b["start"] < a["end"]:
            assert a["gpu"] != b["gpu"], (a, b)
    assert not any(len([e for e in runs if e["start"] <= x["start"] < e["end"]]) > 2 for x in runs)
    assert any("2 GPUs" in line and "2 stages at a time" in line for line in lines)


def test_visible_gpus_follow_cuda_visible_devices_or_the_device_count(monkeypatch):
    import torch

    from med_idefics.workflow.pipeline import visible_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus() == ["0", "1", "2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert visible_gpus() == []


def test_repro_with_jobs_on_a_gpu_machine_pins_its_stages(monkeypatch, tmp_path):
    import torch

    import med_idefics.workflow.pipeline as pipeline

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(pipeline, "setup_tracking_for_parallel_stages", lambda: None)
    monkeypatch.setattr(pipeline, "run_pipeline", lambda jobs, log_dir, echo, gpus: seen.update(jobs=jobs, gpus=gpus))
    pipeline.repro(2, tmp_path, echo=lambda _: None)
    assert seen == {"jobs": 2, "gpus": ["0", "1", "2", "3"]}


def test_bad_jobs_and_dangling_dependencies_are_refused(fake_dvc, tmp_path):
    dvc, _ = fake_dvc
    with pytest.raises(PipelineError, match="at least 1"):
        run_pipeline(0, tmp_path, GRAPH, dvc)
    with pytest.raises(PipelineError, match=r"depend on \['missing'\], which are not stages"):
        run_pipeline(2, tmp_path, {"a": ["missing"]}, dvc, echo=lambda _: None)


# A stage command for the real-DVC test: reads its inputs, sleeps, writes its output, and notes when it ran.
STEP = """
import json, sys, time
name, inputs = sys.argv[1], sys.argv[2:]
start = time.time()
time.sleep(1.5)
text = "".join(open(f"{i}.txt").read() for i in inputs) + name[0]
open(f"{name}.txt", "w").write(text)
json.dump({"start": start, "end": time.time()}, open(f"times-{name}.json", "w"))
"""

DVC_YAML = """
stages:
  first:
    cmd: python step.py first
    outs: [first.txt]
  left:
    cmd: python step.py left first
    deps: [first.txt]
    outs: [left.txt]
  right:
    cmd: python step.py right first
    deps: [first.txt]
    outs: [right.txt]
  last:
    cmd: python step.py last left right
    deps: [left.txt, right.txt]
    outs: [last.txt]
"""


def test_real_dvc_runs_independent_stages_side_by_side_and_records_them_all(tmp_path, monkeypatch):
    """Two `dvc repro --single-item` processes in one workspace: both stages recorded in dvc.lock and the pipeline
    up to date afterwards; a second run runs nothing."""
    bin_dir = Path(sys.executable).parent
    dvc = str(bin_dir / "dvc")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")  # `python` in the stage commands: this one
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([dvc, "init", "-q"], check=True)
    Path("step.py").write_text(STEP)
    Path("dvc.yaml").write_text(DVC_YAML)

    assert stage_graph() == {"first": [], "left": ["first"], "right": ["first"], "last": ["left", "right"]}
    run_pipeline(2, Path("logs"), dvc=(dvc,), echo=lambda _: None)
    times = {name: json.loads(Path(f"times-{name}.json").read_text()) for name in ("first", "left", "right", "last")}
    assert times["left"]["start"] < times["right"]["end"] and times["right"]["start"] < times["left"]["end"]
    assert times["first"]["end"] <= min(times["left"]["start"], times["right"]["start"])
    assert max(times["left"]["end"], times["right"]["end"]) <= times["last"]["start"]
    assert Path("last.txt").read_text() == "flfrl"
    lock = Path("dvc.lock").read_text()
    assert all(f"  {name}:" in lock for name in ("first", "left", "right", "last"))
    status = subprocess.run([dvc, "status", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == {}
    assert "Running stage 'left'" in Path("logs/left.log").read_text()

    again: list[str] = []
    run_pipeline(2, Path("logs"), dvc=(dvc,), echo=again.append)
    assert "didn't change, skipping" in Path("logs/left.log").read_text()
    assert sum(line.endswith("(up to date)") for line in again) == 4


def test_the_cli_refuses_zero_jobs_with_the_reason():
    from click.testing import CliRunner

    from med_idefics.cli import main

    result = CliRunner().invoke(main, ["repro", "--jobs", "0"])
    assert result.exit_code == 1 and "--jobs must be at least 1, got 0" in result.output


def test_more_threads_than_cores_is_warned_with_the_jobs_that_fit():
    assert oversubscription(2, 1, 2) is None and oversubscription(1, 4, 2) is None
    assert "4 threads on 2 cores" in oversubscription(2, 2, 2) and "--jobs 1" in oversubscription(2, 2, 2)
    assert "--jobs 4" in oversubscription(8, 2, 8)


@pytest.mark.parametrize("threads", [1, 2])
def test_make_demo_runs_as_many_stages_as_the_cores_hold_at_its_threads(repo_root, threads):
    """DEMO_JOBS = cores / OMP_NUM_THREADS, with OMP_NUM_THREADS set by the caller (nproc alone would answer it)."""
    cores = len(os.sched_getaffinity(0))
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    env.pop("DEMO_JOBS", None)
    plan = subprocess.run(["make", "-n", "demo"], cwd=repo_root, env=env, capture_output=True, text=True, check=True)
    assert f"med-idefics repro --jobs {max(1, cores // threads)}\n" in plan.stdout
