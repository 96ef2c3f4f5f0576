"""Human evaluation: export a grading sheet (paper's CSV columns + an HTML page with the images), import the graded
sheet into the evaluation's MLflow run — including the paper's own two graded sheets — and reject bad sheets."""

from __future__ import annotations

import base64
import csv
import json
import sys
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from conftest import SHARED_REFERENCE
from mlflow import MlflowClient
from PIL import Image

import med_idefics.cli.report  # noqa: F401  (registers `report` and `review`)
from med_idefics.cli.app import main, run_main
from med_idefics.config import load_params
from med_idefics.data.images import to_png_bytes
from med_idefics.data.schema import write_splits
from med_idefics.reporting.results import write_run_info
from med_idefics.reporting.review import GradingError, export_sheet, import_grades
from med_idefics.tracking.store import setup_tracking

PAPER_HEADER = ["question", "true_answer", "predicted_answer", "correctness", "justification"]
PAPER_SHEETS = {"human_evaluated_stage2_ft_model.csv": 251, "human_eval_base_model.csv": 240}  # right of 400
RECORDS = [  # (id, question, answer): two closed, two open
    ("r0", "is there a fracture?", "yes"),
    ("r1", "where is the lesion, left or right?", "left lobe"),
    ("r2", "is the heart enlarged?", "no"),
    ("r3", 'what is the "bright" <mass>?', "a cyst, likely"),
]
PREDICTED = {"r0": "yes", "r1": "left lobe", "r2": "yes", "r3": "a tumour"}


def png(value: int) -> bytes:
    return to_png_bytes(Image.new("RGB", (8, 8), (value, 255 - value, 3 * value % 256)))


IMAGES = {record_id: png(40 * i + 10) for i, (record_id, _, _) in enumerate(RECORDS)}


@pytest.fixture
def params_args(repo_root, tmp_path) -> list[str]:
    overrides = [f"data.root={tmp_path / 'data'}", "data.vqa.dataset=toy", "data.vqa.eval_split=test"]
    overrides.append("eval.bootstrap_resamples=1000")
    return ["--params", str(repo_root / "params.yaml"), *(arg for o in overrides for arg in ("--set", o))]


@pytest.fixture
def params(params_args):
    return load_params(params_args[1], params_args[3::2])


@pytest.fixture
def evaluated(tmp_path, monkeypatch):
    """A toy VQA split with images, and two-stage predictions on vqa-rad and swap, in the evaluation's layout."""
    monkeypatch.chdir(tmp_path)
    records = [
        {"id": i, "image": IMAGES[i], "question": q, "answer": a, "dataset": "toy", "split": "test",
         "answer_type": "closed" if a in ("yes", "no") else "open"}
        for i, q, a in RECORDS
    ]  # fmt: skip
    write_splits(tmp_path / "data", "toy", {"test": records})
    rows = [{**r, "prediction": PREDICTED[r["id"]], "raw_generation": PREDICTED[r["id"]]} for r in records]
    for suite in ("vqa-rad", "swap"):
        write_jsonl(tmp_path / "outputs" / "predictions" / "two-stage" / f"{suite}.jsonl", rows, drop=("image",))
    return tmp_path


def write_jsonl(path, rows, drop=()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in drop}) + "\n" for r in rows))


def eval_run(params, variant="two-stage", suite="vqa-rad") -> str:
    """A finished evaluation run, named beside metrics/<variant>/<suite>.json as the evaluation stage does."""
    experiment_id = setup_tracking(params)  # first: it points MLflow (a process-wide setting) at this test's store
    run = MlflowClient().create_run(experiment_id, run_name=f"eval-{variant}-{suite}")
    MlflowClient().set_terminated(run.info.run_id)
    path = Path("metrics", variant, f"{suite}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"n": 4}))
    write_run_info(path.parent, {"variant": variant, "eval_runs": {suite: run.info.run_id}})
    return run.info.run_id


def read_sheet(path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def write_sheet(path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)


def test_export_open_questions_with_images(evaluated, params_args):
    result = CliRunner().invoke(main, ["review", "export", "--variant", "two-stage", *params_args])
    assert result.exit_code == 0, result.output
    sheet = read_sheet(evaluated / "reports" / "review" / "two-stage-vqa-rad.csv")
    assert sheet[0][:5] == PAPER_HEADER and sheet[0][5:] == ["id"]
    assert sheet[1:] == [
        ["where is the lesion, left or right?", "left lobe", "left lobe", "", "", "r1"],
        ['what is the "bright" <mass>?', "a cyst, likely", "a tumour", "", "", "r3"],
    ]
    page = (evaluated / "reports" / "review" / "two-stage-vqa-rad.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    for record_id in ("r1", "r3"):
        assert f"data:image/png;base64,{base64.b64encode(IMAGES[record_id]).decode()}" in page
    assert base64.b64encode(IMAGES["r0"]).decode() not in page
    assert "what is the &quot;bright&quot; &lt;mass&gt;?" in page and "<mass>" not in page

    params = load_params(params_args[1], params_args[3::2])
    csv_path, html_path, count = export_sheet(params, "two-stage", out=evaluated / "all.csv", all_types=True)
    assert count == 4 and [row[5] for row in read_sheet(csv_path)[1:]] == ["r0", "r1", "r2", "r3"]
    assert html_path.read_text().count("data:image/png;base64,") == 4


def test_export_swap_shows_the_image_the_model_saw(evaluated, params):
    _, html_path, _ = export_sheet(params, "two-stage", "swap")
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == 2 and "Swap suite" in page
    for record_id in ("r1", "r3"):
        assert base64.b64encode(IMAGES[record_id]).decode() not in page


def test_round_trip_logs_human_accuracy_to_the_run(evaluated, params, params_args):
    csv_path, _, _ = export_sheet(params, "two-stage")
    sheet = read_sheet(csv_path)
    sheet[1][3:5] = ["Right ", 'matches, "exactly"\nsecond line']
    sheet[2][3:5] = ["WRONG", "a tumour is not a cyst"]
    write_sheet(evaluated / "graded.csv", sheet)
    experiment_id = setup_tracking(params)
    run_id = MlflowClient().create_run(experiment_id).info.run_id  # no metrics file: --run-id names it

    args = ["review", "import", "graded.csv", "--variant", "two-stage", "--run-id", run_id, *params_args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "human_accuracy 0.500" in result.output and "1/2 right, open questions" in result.output
    human = json.loads((evaluated / "metrics" / "two-stage" / "vqa-rad-human.json").read_text())
    assert (human["n"], human["n_right"], human["human_accuracy"], human["selection"]) == (2, 1, 0.5, "open")
    assert human["eval_run_id"] == run_id
    run = MlflowClient().get_run(run_id)
    assert run.data.metrics["human_accuracy"] == 0.5
    assert run.data.metrics["human_accuracy_ci_low"] <= 0.5 <= run.data.metrics["human_accuracy_ci_high"]
    assert [a.path for a in MlflowClient().list_artifacts(run_id, "human_eval")] == ["human_eval/graded.csv"]


@pytest.mark.parametrize("sheet_name", PAPER_SHEETS)
@pytest.mark.parametrize("with_ids", [False, True], ids=["paper-rows", "evaluation-rows"])
def test_the_papers_graded_sheets_import(sheet_name, with_ids, tmp_path, monkeypatch, params):
    sheet = SHARED_REFERENCE / "cs231n-results" / sheet_name
    if not sheet.is_file():
        pytest.skip(f"{sheet} absent (the shared reference folder is not checked out)")
    monkeypatch.chdir(tmp_path)
    with open(sheet, newline="", encoding="utf-8") as handle:  # the sheet is the ground truth of what was graded
        graded = list(csv.DictReader(handle))
    rows = [
        {"question": g["question"], "answer": g["true_answer"], "prediction": g["predicted_answer"]} for g in graded
    ]
    if with_ids:  # the evaluation's rows carry ids; the paper's sheet has none: matched by position and text
        rows = [{"id": f"vqa-rad-{i}", **row} for i, row in enumerate(rows)]
    write_jsonl(tmp_path / "outputs" / "predictions" / "paper" / "vqa-rad.jsonl", rows)
    run_id = eval_run(params, variant="paper")

    summary = import_grades(params, sheet, "paper")
    right = PAPER_SHEETS[sheet_name]
    assert (summary["n"], summary["n_right"], summary["selection"]) == (400, right, "all")
    assert summary["human_accuracy"] == right / 400
    assert summary["human_accuracy_ci_low"] < right / 400 < summary["human_accuracy_ci_high"]
    assert MlflowClient().get_run(run_id).data.metrics["human_accuracy"] == right / 400


def graded_sheet(evaluated, params, edit) -> str:
    """The exported open-question sheet, graded right/wrong, then changed by ``edit(rows)``."""
    csv_path, _, _ = export_sheet(params, "two-stage")
    rows = read_sheet(csv_path)
    rows[1][3], rows[2][3] = "right", "wrong"
    edit(rows)
    write_sheet(evaluated / "graded.csv", rows)
    return "graded.csv"


BAD_SHEETS = {
    "empty grade": (lambda rows: rows[2].__setitem__(3, "  "), r"graded\.csv: line 3: correctness is empty"),
    "invalid grade": (
        lambda rows: rows[1].__setitem__(3, "maybe"),
        r"line 2: correctness 'maybe' is not right or wrong",
    ),
    "line after a multi-line cell": (
        lambda rows: (rows[1].__setitem__(4, "two\nlines"), rows[2].__setitem__(3, "")),
        r"line 4: correctness is empty",
    ),
    "fewer rows": (lambda rows: rows.pop(), r"1 graded rows, but .*vqa-rad\.jsonl has 4 predictions \(2 open\)"),
    "other question": (
        lambda rows: (rows[2].__setitem__(0, "is it benign?"), rows[2].__setitem__(5, "")),
        r"line 3: question 'is it benign\?' does not match row 2 of the open predictions",
    ),
    "other prediction": (lambda rows: rows[1].__setitem__(2, "right lobe"), r"line 2: predicted_answer 'right lobe'"),
    "unknown id": (lambda rows: rows[2].__setitem__(5, "zzz"), r"line 3: id 'zzz' is not among the open predictions"),
    "missing column": (lambda rows: [row.pop(3) for row in rows], r"line 1: missing column\(s\) correctness"),
}


@pytest.mark.parametrize("case", BAD_SHEETS)
def test_bad_sheets_are_rejected_naming_the_line(case, evaluated, params):
    edit, message = BAD_SHEETS[case]
    run_id = eval_run(params)
    with pytest.raises(GradingError, match=message):
        import_grades(params, graded_sheet(evaluated, params, edit), "two-stage")
    assert not (evaluated / "metrics" / "two-stage" / "vqa-rad-human.json").exists()
    assert "human_accuracy" not in MlflowClient().get_run(run_id).data.metrics


def test_reordered_sheet_with_ids_imports(evaluated, params):
    eval_run(params)

    def reverse(rows):
        rows[1:] = rows[:0:-1]

    assert import_grades(params, graded_sheet(evaluated, params, reverse), "two-stage")["human_accuracy"] == 0.5


def test_missing_or_unknown_evaluation_run(evaluated, params, params_args, monkeypatch, capsys):
    sheet = graded_sheet(evaluated, params, lambda rows: None)
    with pytest.raises(GradingError, match=r"metrics/two-stage/vqa-rad\.json not found: .* or pass --run-id"):
        import_grades(params, sheet, "two-stage")
    path = evaluated / "metrics" / "two-stage" / "vqa-rad.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"n": 4}))
    with pytest.raises(GradingError, match=r"run_info\.json names no evaluation run of vqa-rad; pass --run-id"):
        import_grades(params, sheet, "two-stage")
    write_run_info(path.parent, {"eval_runs": {"vqa-rad": "0123456789abcdef"}})
    argv = ["med-idefics", "review", "import", sheet, "--variant", "two-stage", *params_args]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        run_main()
    assert exit_info.value.code == 2
    assert "error: MLflow run 0123456789abcdef not found" in capsys.readouterr().err
    assert mlflow.active_run() is None and not (path.parent / "vqa-rad-human.json").exists()


# --------------------------------------------------------------------------------------------------------------------
# Blind grading: several variants in one shuffled sheet that names none of them; a key kept apart unblinds it

SINGLE_STAGE = {"r0": "no", "r1": "right lobe", "r2": "no", "r3": "a cyst, likely"}  # r1 wrong, r3 right


def test_blind_sheet_mixes_variants_and_the_key_unblinds_them(evaluated, params, params_args):
    source = evaluated / "outputs/predictions/two-stage/vqa-rad.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    answers = [
        {**row, "prediction": SINGLE_STAGE[row["id"]], "raw_generation": SINGLE_STAGE[row["id"]]} for row in rows
    ]
    write_jsonl(evaluated / "outputs/predictions/single-stage/vqa-rad.jsonl", answers)
    runs = {variant: eval_run(params, variant) for variant in ("two-stage", "single-stage")}

    args = ["review", "export", "--blind", "--variant", "two-stage", "--variant", "single-stage", *params_args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    folder = evaluated / "reports" / "review" / "blind-vqa-rad"
    sheet, page = read_sheet(folder / "sheet.csv"), (folder / "sheet.html").read_text()
    key_file = evaluated / "reports" / "review" / "blind-vqa-rad.key.json"
    assert sorted(p.name for p in folder.iterdir()) == ["sheet.csv", "sheet.html"]  # the key is not in the folder
    assert f"--key {key_file}" in result.output and f"--key {key_file}" in page
    for text in (json.dumps(sheet), page):
        assert "two-stage" not in text and "single-stage" not in text  # no variant named anywhere a grader looks
    assert sheet[0] == [*PAPER_HEADER, "id"] and [row[5] for row in sheet[1:]] == ["b0001", "b0002", "b0003", "b0004"]
    key = json.loads(key_file.read_text())
    order = [(item["variant"], item["question_id"]) for item in key["items"]]
    assert sorted(order) == sorted((v, q) for v in ("two-stage", "single-stage") for q in ("r1", "r3"))
    assert order != [("two-stage", "r1"), ("two-stage", "r3"), ("single-stage", "r1"), ("single-stage", "r3")]
    assert page.count("data:image/png;base64,") == 4
    for row, item in zip(sheet[1:], key["items"], strict=True):  # each row shows its own question and answer
        prediction = (PREDICTED if item["variant"] == "two-stage" else SINGLE_STAGE)[item["question_id"]]
        assert row[2] == prediction and row[0] == dict((i, q) for i, q, _ in RECORDS)[item["question_id"]]

    for row in sheet[1:]:  # the grader marks right exactly the predictions equal to the truth
        row[3] = "right" if row[1] == row[2] else "wrong"
    write_sheet(evaluated / "graded.csv", sheet)
    result = CliRunner().invoke(main, ["review", "import", "graded.csv", "--key", str(key_file), *params_args])
    assert result.exit_code == 0, result.output
    for variant, right in (("two-stage", 1), ("single-stage", 1)):
        human = json.loads((evaluated / "metrics" / variant / "vqa-rad-human.json").read_text())
        assert (human["n"], human["n_right"], human["blind"], human["eval_run_id"]) == (2, right, True, runs[variant])
        assert MlflowClient().get_run(runs[variant]).data.metrics["human_accuracy"] == 0.5
        assert f"{variant}: human_accuracy 0.500" in result.output

    write_sheet(evaluated / "partial.csv", sheet[:-1])
    partial = CliRunner().invoke(main, ["review", "import", "partial.csv", "--key", str(key_file), *params_args])
    assert partial.exit_code != 0 and "not graded" in str(partial.exception)


def test_blind_needs_two_variants_and_plain_import_needs_its_variant(evaluated, params, params_args):
    with pytest.raises(GradingError, match="at least twice"):
        from med_idefics.reporting.blind_review import export_blind

        export_blind(params, ["two-stage"], "vqa-rad")
    missing = CliRunner().invoke(main, ["review", "import", "x.csv", *params_args])
    assert missing.exit_code != 0
    page = export_sheet(params, "two-stage")[1].read_text()
    assert "med-idefics review import two-stage-vqa-rad.csv --variant two-stage --suite vqa-rad" in page
