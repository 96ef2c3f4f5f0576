"""`med-idefics score FILE` and the prediction files it reads: both formats, params defaults, and bad input."""

from __future__ import annotations

import json
import re
import sys

import pytest
from click.testing import CliRunner
from conftest import SHARED_REFERENCE

import med_idefics.cli.score  # noqa: F401  (registers `score` even before cli/__init__ imports it)
from med_idefics.cli.app import main, run_main
from med_idefics.scoring.metrics import MODES
from med_idefics.scoring.predictions import PredictionsError, read_predictions, write_predictions

ROWS = [
    {"id": "a", "question": "is the lung clear?", "answer": "yes", "prediction": "yes", "raw_generation": "Yes."},
    {"id": "b", "question": "any effusion?", "answer": "no", "prediction": "yes"},
    {"id": "c", "question": "where is the mass?", "answer": "right upper lobe", "prediction": "upper lobe"},
    {"id": "d", "question": "which side?", "answer": "left", "prediction": "left", "answer_type": "closed"},
]


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def score(repo_root, *args: str) -> dict:
    result = CliRunner().invoke(main, ["score", *args, "--params", str(repo_root / "params.yaml")])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_score_jsonl(tmp_path, repo_root):
    path = tmp_path / "predictions.jsonl"
    path.write_text(jsonl(ROWS), encoding="utf-8")
    summary = score(repo_root, str(path), "--seed", "1", "--resamples", "1000")
    assert (summary["n"], summary["n_closed"], summary["n_open"]) == (4, 3, 1)
    assert summary["exact_match"] == pytest.approx(2 / 4)
    assert summary["f1"] == pytest.approx((1 + 0 + 0.8 + 1) / 4)
    assert summary["closed_accuracy"] == pytest.approx(2 / 3)
    assert summary["open_recall"] == pytest.approx(2 / 3)
    for name in ("exact_match", "f1", "bleu", "closed_accuracy", "open_recall"):
        assert summary[f"{name}_ci_low"] <= summary[name] <= summary[f"{name}_ci_high"]


def test_seed_and_resamples_default_to_params(tmp_path, repo_root):
    path = tmp_path / "predictions.jsonl"
    path.write_text(jsonl(ROWS * 5), encoding="utf-8")
    explicit = score(repo_root, str(path), "--seed", "3", "--resamples", "1000")
    from_params = score(repo_root, str(path), "--set", "eval.seed=3", "--set", "eval.bootstrap_resamples=1000")
    assert from_params == explicit
    assert score(repo_root, str(path), "--seed", "4", "--resamples", "1000") != explicit


def test_strict_and_llava_med_modes_from_the_cli(tmp_path, repo_root):
    path = tmp_path / "predictions.jsonl"
    rows = [{"question": "normal?", "answer": "no", "prediction": "normal"},
            {"question": "where?", "answer": "left lung", "prediction": "lung lung lung"}]  # fmt: skip
    path.write_text(jsonl(rows), encoding="utf-8")
    paper = score(repo_root, str(path), "--resamples", "1000")  # the default: the paper's substring test
    assert (paper["closed_accuracy"], paper["closed_accuracy_strict"], paper["open_recall"]) == (1.0, 0.0, 0.5)
    strict = score(repo_root, str(path), "--resamples", "1000", "--mode", "strict")
    assert (strict["closed_accuracy"], strict["exact_match"]) == (0.0, 0.0)
    llava = score(repo_root, str(path), "--resamples", "1000", "--mode", "llava-med")
    assert (llava["closed_accuracy"], llava["open_recall"]) == (1.0, 0.75)


def test_cli_modes_are_the_metrics_modes():
    (mode_option,) = [param for param in main.commands["score"].params if param.name == "mode"]
    assert tuple(mode_option.type.choices) == MODES


@pytest.mark.skipif(not SHARED_REFERENCE.is_dir(), reason=f"reference data not present at {SHARED_REFERENCE}")
def test_score_the_papers_result_file(repo_root):
    path = SHARED_REFERENCE / "cs231n-results" / "eval_full_stage2_results.json"
    summary = score(repo_root, str(path), "--resamples", "1000")
    assert summary["n"] == 400 and summary["n_closed"] + summary["n_open"] == 400
    assert (summary["exact_match"], summary["f1"], summary["bleu"]) == pytest.approx((0.5575, 0.5790, 0.5666), abs=1e-4)
    assert summary["exact_match_ci_low"] < 0.5575 < summary["exact_match_ci_high"]


@pytest.mark.skipif(not SHARED_REFERENCE.is_dir(), reason=f"reference data not present at {SHARED_REFERENCE}")
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_scores_the_papers_result_file(repo_root, mode):
    path = SHARED_REFERENCE / "cs231n-results" / "baseline_results.json"
    summary = score(repo_root, str(path), "--resamples", "1000", "--mode", mode)
    assert (summary["n"], summary["n_closed"], summary["n_open"]) == (400, 221, 179)
    for name in ("closed_accuracy_strict", "exact_match", "f1", "bleu", "closed_accuracy", "open_recall"):
        assert 0 < summary[f"{name}_ci_low"] <= summary[name] <= summary[f"{name}_ci_high"] < 1, name


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["med-idefics", "score", *args])
    with pytest.raises(SystemExit) as exit_info:
        run_main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (jsonl(ROWS[:1]) + '{"question": "q", "answer": "yes"}\n', r"line 2: missing field\(s\) prediction"),
        (b"", "the file is empty"),
        (jsonl(ROWS[:2]).encode() + b'{"question": "caf\xe9"}\n', "line 3: not UTF-8 text"),
        (jsonl(ROWS[:1]) + '{"question": "q", "answer": \n', "line 2: invalid JSON"),
        (jsonl(ROWS[:1]) + "\n" + '["q", "yes", "yes"]\n', "line 3: expected a JSON object, got list"),
        (jsonl(ROWS[:1]) + '{"question": "q", "answer": "yes", "prediction": null}\n', "line 2: field 'prediction'"),
        ('{"question": "q", "answer": "yes", "prediction": "no", "answer_type": "yes/no"}', "line 1: answer_type"),
        (
            '[{"question": "q", "true_answer": "yes", "predicted_answer": "yes"},\n'
            ' {"question": "q2", "true_answer": "no"}]',
            r"row index 1: missing field\(s\) prediction",
        ),
        ('[{"question": "q", "true_answer": "yes",\n  "predicted_answer": }]', "line 2: invalid JSON"),
        ("[]", "no prediction rows"),
    ],
    ids=[
        "missing-field",
        "empty",
        "not-utf8",
        "invalid-json",
        "not-an-object",
        "null-prediction",
        "bad-answer-type",
        "json-list-missing-field",
        "json-list-invalid",
        "json-list-empty",
    ],
)
def test_bad_input_exits_2_naming_file_and_line(tmp_path, monkeypatch, capsys, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, err = run_cli(monkeypatch, capsys, str(path))
    assert code == 2
    assert err.startswith(f"error: {path}: ")
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_missing_file_is_a_usage_error(tmp_path, monkeypatch, capsys):
    code, err = run_cli(monkeypatch, capsys, str(tmp_path / "absent.jsonl"))
    assert code == 2 and "does not exist" in err


def test_write_predictions_round_trip_atomically(tmp_path):
    rows = [
        {
            "id": "1",
            "question": "q?",
            "answer": "yes",
            "answer_type": "closed",
            "prediction": "yes",
            "raw_generation": "Answer: yes<end_of_utterance>",
            "ignored": 1,
        },
        {
            "id": "2",
            "question": "où?",
            "answer": "poumon",
            "answer_type": "open",
            "prediction": "",
            "raw_generation": "",
        },
    ]
    path = write_predictions(tmp_path / "out" / "predictions.jsonl", rows)
    expected = [{k: v for k, v in r.items() if k != "ignored"} for r in rows]
    assert read_predictions(path) == expected
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == expected
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_write_predictions_refuses_incomplete_rows_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text("old\n", encoding="utf-8")
    with pytest.raises(PredictionsError, match=r"row 0 \(id 7\): missing field\(s\) \['answer_type'"):
        write_predictions(path, [{"id": "7", "question": "q", "answer": "yes", "prediction": "yes"}])
    assert path.read_text(encoding="utf-8") == "old\n"
    assert list(tmp_path.iterdir()) == [path]
