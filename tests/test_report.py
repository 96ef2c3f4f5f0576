"""`med-idefics report`: the Figure-2 table with intervals, the paired tests, the two figures and the MLflow run —
built from fixture metrics and predictions in the evaluation stage's layout."""

from __future__ import annotations

import io
import json
import re
import sys

import pytest
from mlflow import MlflowClient
from PIL import Image

import med_idefics.cli.report  # noqa: F401  (registers `report` and `review`)
from med_idefics.cli.app import run_main
from med_idefics.config import load_params
from med_idefics.metrics import summarize
from med_idefics.plots import Estimate, curves
from med_idefics.report import build_report
from med_idefics.results import METRIC_LABELS, ResultsError, write_run_info

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N = 40  # questions per suite: the first half closed (yes/no), the second open


def questions() -> list[dict]:
    rows = []
    for i in range(N):
        closed = i < N // 2
        answer = ("yes" if i % 2 else "no") if closed else f"finding {i}"
        rows.append({"id": f"q{i}", "question": f"question {i}?", "answer": answer})
    return rows


def predicted(right: int) -> list[dict]:
    """Predictions right on the first ``right`` closed and the first ``right`` open questions, wrong elsewhere."""
    rows = []
    for i, row in enumerate(questions()):
        closed = i < N // 2
        ok = (i if closed else i - N // 2) < right
        wrong = ("no" if row["answer"] == "yes" else "yes") if closed else "nothing"
        answer_type = "closed" if closed else "open"
        prediction = row["answer"] if ok else wrong
        rows.append({**row, "answer_type": answer_type, "prediction": prediction, "raw_generation": prediction})
    return rows


def write_variant(root, variant: str, suite: str, rows: list[dict], extra: dict | None = None) -> None:
    predictions = root / "outputs" / "predictions" / variant / f"{suite}.jsonl"
    predictions.parent.mkdir(parents=True, exist_ok=True)
    predictions.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    metrics = root / "metrics" / variant / f"{suite}.json"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows, seed=0, resamples=1000)
    metrics.write_text(json.dumps({**summary, **(extra or {})}))
    write_run_info(metrics.parent, {"variant": variant, "eval_runs": {suite: f"run-{variant}-{suite}"}})


@pytest.fixture
def params(repo_root):
    return load_params(repo_root / "params.yaml", ["eval.bootstrap_resamples=1000"])


@pytest.fixture
def evaluated(tmp_path, monkeypatch):
    """base and single-stage mostly wrong, two-stage right; swap and expert-prompt identical to plain; a sweep."""
    monkeypatch.chdir(tmp_path)
    write_variant(tmp_path, "base", "vqa-rad", predicted(10))
    write_variant(tmp_path, "single-stage", "vqa-rad", predicted(4))
    for suite in ("vqa-rad", "swap", "expert-prompt"):
        write_variant(tmp_path, "two-stage", suite, predicted(N // 2))
    halt = {"abstention_rate": 0.25, "abstention_rate_ci_low": 0.1, "abstention_rate_ci_high": 0.4}
    halt |= {"hallucination_rate": 0.75, "hallucination_rate_ci_low": 0.6, "hallucination_rate_ci_high": 0.9}
    write_variant(tmp_path, "two-stage", "med-halt", predicted(5)[:8], halt)
    write_variant(tmp_path, "two-stage-n500", "vqa-rad", predicted(8))
    write_variant(tmp_path, "two-stage-n1500", "vqa-rad", predicted(14))
    human = {"n": 2, "n_right": 1, "human_accuracy": 0.5, "human_accuracy_ci_low": 0.0, "human_accuracy_ci_high": 1.0}
    (tmp_path / "metrics" / "two-stage" / "vqa-rad-human.json").write_text(json.dumps(human))
    return tmp_path


def table_row(text: str, *cells: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith("| " + " | ".join(cells) + " |")]
    return line


def section(text: str, title: str) -> str:
    return text.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
        assert image.size[0] > 100 and image.size[1] > 100


def test_report_tables_tests_figures_and_run(evaluated, params):
    written = build_report(params)
    text = (evaluated / "reports" / "results.md").read_text()
    assert written["report"].resolve() == evaluated / "reports" / "results.md"
    assert "the registry promotes on `validation` closed_accuracy_strict, the validation split" in text
    assert "no test suite chooses a model" in text

    # the Figure-2 table: every variant × suite, values with intervals, "—" for what was not evaluated
    assert "| Suite | Variant | n | Closed acc. (strict) | EM | F1 | BLEU | Closed acc. (paper) | Open recall |" in text
    two_stage = table_row(text, "vqa-rad", "two-stage", "40")
    assert two_stage.count("1.000 [1.00, 1.00]") == 6  # strict closed acc., EM, F1, BLEU, paper closed acc., recall
    base = table_row(text, "vqa-rad", "base", "40")
    assert re.search(r"\| 0\.500 \[0\.\d\d, 0\.\d\d\] \|", base)  # EM: 10 + 10 of 40 right
    assert table_row(text, "path-vqa", "base", "—").count("—") == 7
    assert not [line for line in text.splitlines() if line.startswith("| vqa-rad | two-stage-n")]  # in Figure 3
    assert "0.250 [0.10, 0.40]" in table_row(text, "two-stage", "8")  # med-halt: abstention, hallucination
    assert "0.750 [0.60, 0.90]" in table_row(text, "two-stage", "8")

    # paired tests: clearly better → significant; identical → not; absent → said so
    better = section(text, "Two-stage vs single-stage")
    assert "**yes**" in table_row(better, "EM") and "+0.800" in table_row(better, "EM")
    assert "**yes**" in table_row(better, "Closed acc. (strict)") and "**yes**" in table_row(
        better, "Closed acc. (paper)"
    )
    swap = section(text, "Swapped image vs plain (two-stage)")
    for label in ("EM", "F1", "Closed acc. (strict)", "Closed acc. (paper)"):
        assert "+0.000" in table_row(swap, label) and table_row(swap, label).endswith("| no |")
    assert table_row(swap, "EM").split(" | ")[4] == "1"  # McNemar p without discordant pairs
    assert "not evaluated" in section(text, "Two-stage vs base, out of domain")

    # human grades: their own table, never a suite
    assert table_row(text, "two-stage", "vqa-rad", "1/2", "0.500 [0.00, 1.00]")
    assert "vqa-rad-human" not in text

    # the sweep table and both figures
    assert table_row(text, "500") and table_row(text, "1,500")
    for name in ("figure2", "figure3"):
        assert written[name].resolve().parent == evaluated / "reports"
        assert_png(written[name])
        assert f"]({name}.png)" in text
    assert not list((evaluated / "reports").glob(".*.tmp"))  # atomic writes leave no temp files

    client = MlflowClient()
    (run,) = client.search_runs(
        [client.get_experiment_by_name(params.mlflow.experiment).experiment_id], "attributes.run_name = 'report'"
    )
    assert run.info.status == "FINISHED"
    files = {"results.md", "figure2.png", "figure3.png", "paired_tests.json"}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= files
    # the report run holds files and a few counts; each variant's numbers live on its own run
    assert run.data.metrics == {"variants": 5, "suites": 4, "claims_tested": 4}
    assert "run_info" not in text  # the ids beside the metrics are no suite

    claims = {c["title"]: c for c in json.loads(written["paired_tests"].read_text())["claims"]}
    better = claims["Two-stage vs single-stage"]
    assert better["a"] == {"variant": "single-stage", "suite": "vqa-rad"}
    assert better["test"]["exact_match"]["significant"] is True
    assert better["test"]["exact_match"]["diff"] == pytest.approx(0.8)
    assert claims["Two-stage vs base, out of domain"]["not_tested"].startswith("not evaluated")


def test_compare_prints_variants_by_headline_metrics_with_intervals(evaluated, monkeypatch):
    from click.testing import CliRunner

    from med_idefics.cli.app import main

    monkeypatch.setenv("COLUMNS", "250")  # rich wraps to the terminal width
    result = CliRunner().invoke(main, ["compare", "--suite", "vqa-rad"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if "Variant" in line)
    positions = [header.index(label) for label in ("Variant", *METRIC_LABELS.values())]  # each one, in order
    assert positions == sorted(positions)
    rows = {line.split()[1]: line for line in lines if line.startswith("│") and "Variant" not in line}
    assert list(rows) == ["base", "single-stage", "two-stage", "two-stage-n1500", "two-stage-n500"]
    assert rows["two-stage"].count("1.000 [1.00, 1.00]") == len(METRIC_LABELS)
    assert re.search(r"0\.500 \[0\.\d\d, 0\.\d\d\]", rows["base"])  # EM: 20 of 40 right

    halt = CliRunner().invoke(main, ["compare", "--suite", "med-halt"], catch_exceptions=False).output
    assert "Hallucination rate" in halt and "0.750 [0.60, 0.90]" in halt and "single-stage" not in halt
    everything = CliRunner().invoke(main, ["compare"], catch_exceptions=False).output
    assert [line.split(" (")[0] for line in everything.splitlines() if "bootstrap intervals" in line] == [
        "vqa-rad", "swap", "expert-prompt", "med-halt"
    ]  # fmt: skip


def test_compare_without_the_suite_says_what_to_run(evaluated):
    from med_idefics.compare import comparison_tables

    with pytest.raises(ResultsError, match=r"no metrics for suite\(s\) path-vqa .*evaluate them first"):
        comparison_tables(suites=["path-vqa"])


def test_partial_results_without_sweep_still_report(tmp_path, monkeypatch, params):
    monkeypatch.chdir(tmp_path)
    write_variant(tmp_path, "two-stage", "vqa-rad", predicted(12))
    written = build_report(params, out=tmp_path / "out" / "r.md")
    text = written["report"].read_text()
    assert table_row(text, "vqa-rad", "single-stage", "—").count("—") == 7
    assert "no sweep points" in text
    assert_png(tmp_path / "out" / "figure3.png")


def test_empty_sweep_figure_is_a_figure():
    reference = {"EM": {"single-stage": Estimate(0.5)}}
    empty = curves({"EM": []}, "t", "n", "score", references=reference, empty_message="no sweep points")
    drawn = curves({"EM": [(500, Estimate(0.4, 0.3, 0.5)), (1500, Estimate(0.6))]}, "t", "n", "score")
    assert empty.startswith(PNG_MAGIC) and drawn.startswith(PNG_MAGIC) and empty != drawn


def test_no_metrics_is_an_error(tmp_path, monkeypatch, params, repo_root, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ResultsError, match="run the evaluations first"):
        build_report(params)
    (tmp_path / "metrics" / "base").mkdir(parents=True)
    monkeypatch.setattr(sys, "argv", ["med-idefics", "report", "--params", str(repo_root / "params.yaml")])
    with pytest.raises(SystemExit) as exit_info:
        run_main()
    assert exit_info.value.code == 2
    assert "error: no evaluation metrics under metrics/" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()


def test_unreadable_metrics_name_the_file(tmp_path, monkeypatch, params):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics" / "base").mkdir(parents=True)
    (tmp_path / "metrics" / "base" / "vqa-rad.json").write_text("{not json")
    with pytest.raises(ResultsError, match=r"metrics/base/vqa-rad\.json: unreadable"):
        build_report(params)


def test_cli_defaults_are_the_modules():
    from med_idefics.cli.report import report_command, review_export_command
    from med_idefics.data.suites import SUITES
    from med_idefics.report import METRICS_DIR, PREDICTIONS_DIR, REPORT_FILE

    defaults = {option.name: option for option in report_command.params}
    assert (defaults["metrics_dir"].default, defaults["predictions_dir"].default) == (METRICS_DIR, PREDICTIONS_DIR)
    assert defaults["out"].default == REPORT_FILE
    suite = {option.name: option for option in review_export_command.params}["suite"]
    assert tuple(suite.type.choices) == SUITES
