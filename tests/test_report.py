"""`med-idefics report`: the Figure-2 table with intervals, the paired tests, the two figures and the MLflow run —
built from fixture metrics and predictions in the evaluation stage's layout."""

from __future__ import annotations

import io
import json
import math
import re
import sys

import pytest
from conftest import REPO_ROOT
from mlflow import MlflowClient
from PIL import Image

import med_idefics.cli.report  # noqa: F401  (registers `report` and `review`)
from med_idefics.cli.app import run_main
from med_idefics.config import load_params
from med_idefics.reporting.plots import Estimate, curves_figure, to_png
from med_idefics.reporting.results import ResultsError, write_run_info
from med_idefics.scoring.metrics import summarize
from med_idefics.stages.report import build_report

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


def chapter(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


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
    header = "| Suite | Variant | n (closed/open) | Closed acc. (strict) | EM | F1 | BLEU | Closed acc. (paper) |"
    assert header + " Open recall |" in text
    two_stage = table_row(text, "vqa-rad", "two-stage", "40 (20/20)")
    assert two_stage.count("1.000 [1.00, 1.00]") == 6  # strict closed acc., EM, F1, BLEU, paper closed acc., recall
    base = table_row(text, "vqa-rad", "base", "40 (20/20)")
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
    assert table_row(swap, "EM").split(" | ")[5:7] == ["1", "1"]  # McNemar p (and Holm's) without discordant pairs
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
    files = {"results.md", "figure2.png", "figure3.png", "figure3.csv", "paired_tests.json", "headline.json"}
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


def test_compare_fits_80_columns_with_intervals_and_their_n(evaluated, monkeypatch):
    """In an 80-column terminal: a table per suite, a row per variant, each headline metric as `value [95 % CI]` in
    one piece, the n it rests on in its header; --all-metrics adds the others; every suite it prints is accepted."""
    from click.testing import CliRunner

    from med_idefics.cli.app import main

    write_variant(evaluated, "two-stage", "validation", predicted(15))
    monkeypatch.setenv("COLUMNS", "80")  # rich wraps to the terminal width
    result = CliRunner().invoke(main, ["compare", "--suite", "vqa-rad", "--all-metrics"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 80, result.output
    headline, more = (line for line in lines if line.startswith("vqa-rad"))
    assert headline.startswith("vqa-rad: value [95 % CI]") and more.startswith("vqa-rad (more metrics)")
    headers = "\n".join(lines[: lines.index(more)])
    for label in ("Closed (strict)", "EM", "Open recall", "n = 20", "n = 40"):
        assert label in headers, label
    rows = {
        line.split()[0]: line
        for line in lines[: lines.index(more)]
        if line.split()[:1] in (["base"], ["single-stage"]) or line.lstrip().startswith("two-stage")
    }
    assert list(rows) == ["base", "single-stage", "two-stage", "two-stage-n1500", "two-stage-n500"]
    assert rows["two-stage"].count("1.000 [1.00, 1.00]") == 3  # closed, EM, open recall: whole, not wrapped
    assert re.search(r"0\.500 \[0\.\d\d, 0\.\d\d\]", rows["base"])  # EM: 20 of 40 right
    assert "F1" in result.output.split(more, 1)[1] and "BLEU" in result.output.split(more, 1)[1]

    validation = CliRunner().invoke(main, ["compare", "--suite", "validation"], catch_exceptions=False)
    assert validation.exit_code == 0 and "0.750 [" in validation.output  # 15 + 15 of 40 right
    halt = CliRunner().invoke(main, ["compare", "--suite", "med-halt", "--all-metrics"], catch_exceptions=False).output
    assert "Hallucination rate" in halt and "0.750 [0.60, 0.90]" in halt and "single-stage" not in halt
    everything = CliRunner().invoke(main, ["compare"], catch_exceptions=False).output
    assert [line.split(":")[0] for line in everything.splitlines() if "[95 % CI]" in line] == [
        "vqa-rad", "swap", "expert-prompt", "med-halt", "validation"
    ]  # fmt: skip
    as_json = json.loads(CliRunner().invoke(main, ["compare", "--json"], catch_exceptions=False).output)
    assert as_json["suites"]["vqa-rad"]["two-stage"]["exact_match"] == {
        "value": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 40
    }  # fmt: skip
    assert as_json["suites"]["vqa-rad"]["base"]["open_recall"]["n"] == 20


def test_compare_without_the_suite_says_what_to_run(evaluated):
    from med_idefics.reporting.compare import comparison_tables

    with pytest.raises(ResultsError, match=r"no metrics for suite\(s\) path-vqa .*evaluate them first"):
        comparison_tables(suites=["path-vqa"])


def test_compare_reads_metrics_anywhere_and_needs_params_only_from_mlflow(evaluated, monkeypatch):
    """Without params.yaml here, `compare` still reads a metrics folder; --from-mlflow, which groups the runs of the
    configuration params.yaml holds, says what it needs."""
    from click.testing import CliRunner

    from med_idefics.cli.app import main

    elsewhere = evaluated / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    shown = CliRunner().invoke(main, ["compare", "--metrics-dir", str(evaluated / "metrics"), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["suites"]["vqa-rad"]["two-stage"]["exact_match"]["n"] == 40
    refused = CliRunner().invoke(main, ["compare", "--from-mlflow"])
    assert refused.exit_code != 0
    assert "reads params.yaml: run it in the checkout, or pass --params" in str(refused.exception)


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
    empty = to_png(curves_figure({"EM": []}, "t", "n", "score", references=reference, empty_message="no sweep points"))
    drawn = to_png(curves_figure({"EM": [(500, Estimate(0.4, 0.3, 0.5)), (1500, Estimate(0.6))]}, "t", "n", "score"))
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
    from med_idefics.stages.report import METRICS_DIR, PREDICTIONS_DIR, REPORT_FILE

    defaults = {option.name: option for option in report_command.params}
    assert (defaults["metrics_dir"].default, defaults["predictions_dir"].default) == (METRICS_DIR, PREDICTIONS_DIR)
    assert defaults["out"].default == REPORT_FILE
    suite = {option.name: option for option in review_export_command.params}["suite"]
    assert tuple(suite.type.choices) == SUITES


# --------------------------------------------------------------------------------------------------------------------
# What a reviewer asks: provenance, question types, yes-rate, multiple testing, n, Figure 3's every point, seeds


def write_question_types(root, types: dict[str, str]) -> None:
    """data/demo/test.parquet with an optional question_type column (what report reads the types from)."""
    from med_idefics.data.schema import write_splits

    records = [
        {"id": row["id"], "image": None, "question": row["question"], "answer": row["answer"], "dataset": "demo",
         "split": "test", "answer_type": "closed" if row["answer"] in ("yes", "no") else "open",
         "question_type": types.get(row["id"])}
        for row in questions()
    ]  # fmt: skip
    write_splits(root / "data", "demo", {"test": records})


def test_report_states_provenance_types_yes_rate_holm_and_headline(evaluated, params):
    write_question_types(
        evaluated, {f"q{i}": "PRES" if i < 10 else "COUNT" if i < 30 else " modality" for i in range(N)}
    )
    written = build_report(params)
    text = written["report"].read_text()

    provenance = text.split("## Provenance\n", 1)[1].split("\n## ", 1)[0]
    assert table_row(provenance, "Training seed", "42 (`seed`)")
    assert (
        "| Commit | `" in provenance
        and "| Profile | `demo` |" in provenance
        and "| Data | `data.dvc` md5" in provenance
    )
    evaluations = "expert-prompt `run-two-`, med-halt `run-two-`, swap `run-two-`, vqa-rad `run-two-`"
    assert table_row(provenance, "two-stage", "—", "—", evaluations)  # no training run recorded in the fixture

    # accuracy by question type: n (closed/open) per type, a column per variant; types normalized (" modality")
    types = text.split("## Accuracy by question type (vqa-rad)\n", 1)[1].split("\n## ", 1)[0]
    assert "| Question type | n (closed/open) | base | single-stage | two-stage |" in types
    assert re.search(r"\| PRES \| 10 \(10/0\) \| 1\.000 \[1\.00, 1\.00\] \| 0\.400 ", types)  # base 10/10, single 4/10
    assert table_row(types, "COUNT", "20 (10/10)") and table_row(types, "MODALITY", "10 (0/10)")

    # yes-rate: base is right on its first 10 closed questions and flips the rest; truth is yes half the time
    yes_rate = text.split("## Closed answers: yes-rate (vqa-rad)\n", 1)[1].split("\n## ", 1)[0]
    assert table_row(yes_rate, "two-stage", "20", "0.500", "0.500", "0.000", "0.500")

    # Holm beside the raw p-values; the verdict uses the adjusted one
    claims = {c["title"]: c for c in json.loads(written["paired_tests"].read_text())["claims"]}
    em = claims["Two-stage vs single-stage"]["test"]["exact_match"]
    assert em["p_holm"] >= em["p_value"] and claims["Two-stage vs single-stage"]["reproduced"] is True
    assert claims["Swapped image vs plain (two-stage)"]["reproduced"] is False
    assert claims["Two-stage vs base, out of domain"]["reproduced"] is None
    tested = [entry for c in claims.values() for entry in c.get("test", {}).values() if isinstance(entry, dict)]
    p_values = [entry["p_value"] for entry in tested if "p_value" in entry]
    assert len(p_values) == 12 and f"Holm-adjusted over all {len(p_values)} McNemar tests" in text

    # the DVC metrics file: variant → suite → headline metric, numbers only
    headline = json.loads(written["headline"].read_text())
    assert headline["two-stage"]["vqa-rad"] == {"closed": 1.0, "em": 1.0, "open": 1.0}
    assert headline["two-stage"]["med-halt"] == {"abstain": 0.25}
    assert headline["base"]["vqa-rad"]["em"] == 0.5 and set(headline) == {
        "base", "single-stage", "two-stage", "two-stage-n1500", "two-stage-n500"
    }  # fmt: skip


def test_figure3_draws_every_point_single_stage_included(evaluated, repo_root):
    """n = 0 (single-stage) is on the axis and drawn, beside the sweep points and two-stage (the full stage-1 set);
    checked on the matplotlib artists, not only on the CSV."""
    import csv

    from med_idefics.reporting.figures import figure3, figure3_series
    from med_idefics.reporting.results import load_scores

    params = load_params(repo_root / "params.yaml", ["data.captions.train_size=2000"])
    points = figure3_series(load_scores("metrics")[0], params)
    assert sorted(points) == [0, 500, 1500, 2000]
    figure = figure3(points)
    (ax,) = figure.axes
    low, high = ax.get_xlim()
    for line in ax.get_lines():
        xs, ys = list(line.get_xdata()), list(line.get_ydata())
        assert xs == [0, 500, 1500, 2000], xs
        assert all(low < x < high for x in xs), (low, high)
        finite = ax.transData.transform([(x, y) for x, y in zip(xs, ys, strict=True)])
        assert all(map(math.isfinite, finite.ravel()))  # a log axis would send 0 to -inf
    em = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}["EM"]
    assert em == [pytest.approx(0.2), pytest.approx(0.4), pytest.approx(0.7), 1.0]  # single, n500, n1500, two-stage
    assert ax.get_xscale() != "log"
    labels = [tick.get_text() for tick in ax.get_xticklabels()]
    assert labels[0] == "0\nsingle-stage" and labels[-1] == "2,000\ntwo-stage"

    written = build_report(params)
    rows = list(csv.DictReader(written["figure3_data"].open()))
    assert [(r["n"], r["variant"]) for r in rows] == [
        ("0", "single-stage"), ("500", "two-stage-n500"), ("1500", "two-stage-n1500"), ("2000", "two-stage")
    ]  # fmt: skip
    assert float(rows[0]["exact_match"]) == pytest.approx(0.2) and rows[0]["questions"] == "40"


def _logged_eval(params, variant: str, suite: str, rows: list[dict]) -> None:
    """An evaluation run as the evaluation stage logs it: tags variant and suite, the config as params, metrics."""
    import mlflow

    from med_idefics.tracking.runs import tracked_run

    summary = summarize(rows, seed=0, resamples=200)
    with tracked_run(params, f"eval-{variant}-{suite}", tags={"variant": variant, "suite": suite}):
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, int | float)})


def test_report_and_compare_over_seeds_from_the_tracking_store(evaluated, params, monkeypatch):
    """A store with another seed's runs of the same configuration: the report's over-seeds table and
    `compare --from-mlflow` show mean ± sd over both seeds; a run of another configuration is left out."""
    from click.testing import CliRunner

    from med_idefics.cli.app import main

    other_seed = params_with(params, "seed=7")
    for variant, right in (("base", 10), ("single-stage", 14), ("two-stage", 18)):
        _logged_eval(other_seed, variant, "vqa-rad", predicted(right))
    _logged_eval(params_with(params, "seed=7", "stage2.lr=0.5"), "two-stage", "vqa-rad", predicted(0))  # left out
    build_report(other_seed, out="seed7/results.md")  # seed 7's report run: its claims' verdicts

    text = build_report(params)["report"].read_text()
    seeds = text.split("## Over training seeds\n", 1)[1].split("\n## ", 1)[0]
    assert "Seeds 7, 42" in seeds and "1 runs of another configuration left out" in seeds
    assert "3 evaluation runs and 1 report runs read from the store" in seeds  # seed 7's; seed 42 from its files
    two_stage = table_row(seeds, "two-stage")
    assert "0.950 ± 0.071 (2)" in two_stage  # EM: 36/40 at seed 7, 40/40 at seed 42
    assert table_row(seeds, "Two-stage vs single-stage", "2 of 2", "7, 42")
    assert table_row(seeds, "Swapped image vs plain (two-stage)", "0 of 2", "—")

    for variant, right in (("base", 10), ("single-stage", 4), ("two-stage", N // 2)):  # seed 42's, as evaluated
        _logged_eval(params, variant, "vqa-rad", predicted(right))
    monkeypatch.setenv("COLUMNS", "80")
    args = ["compare", "--from-mlflow", "--suite", "vqa-rad", "--params", str(REPO_ROOT / "params.yaml")]
    args += ["--set", "eval.bootstrap_resamples=1000"]  # the configuration of the runs: every param but the seed
    result = CliRunner().invoke(main, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["seeds"] == [7, 42] and data["left_out"] == 1
    for variant in ("base", "single-stage", "two-stage"):
        entry = data["suites"]["vqa-rad"][variant]
        assert entry["seeds"] == [7, 42] and entry["metrics"]["em"]["n_seeds"] == 2
    assert data["suites"]["vqa-rad"]["two-stage"]["metrics"]["em"]["mean"] == pytest.approx(0.95)
    table = CliRunner().invoke(main, args, catch_exceptions=False)
    assert max(map(len, table.output.splitlines())) <= 80, table.output
    assert "two-stage" in table.output and "0.950 ± 0.071 (2)" in table.output
    assert "1 evaluation runs of another configuration left out" in table.output


def params_with(params, *overrides: str):
    return load_params(REPO_ROOT / "params.yaml", ["eval.bootstrap_resamples=1000", *overrides])


def test_a_wide_sweep_keeps_zero_on_a_symmetric_log_axis():
    points = [(0, Estimate(0.5)), (100, Estimate(0.6)), (500, Estimate(0.7)), (55_000, Estimate(0.8))]
    (ax,) = curves_figure({"EM": points}, "t", "n", "score").axes
    assert ax.get_xscale() == "symlog" and ax.get_xlim()[0] < 0 < ax.get_xlim()[1]
    assert list(ax.get_lines()[0].get_xdata()) == [0, 100, 500, 55_000]
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["0", "100", "500", "55,000"]


def blind(rows: list[dict], answer: str = "yes") -> list[dict]:
    """What a variant answers without the image: ``answer`` to every closed question, nothing right on open ones."""
    return [{**r, "prediction": answer if r["answer_type"] == "closed" else "nothing"} for r in rows]


def write_robustness(root, variant: str, sighted: list[dict], blank: list[dict], suites=("vqa-rad", "blank")) -> None:
    """The variant's sighted suite with its rewording pairs scored, and its blank twin with its image reliance, as
    evaluate writes them."""
    from med_idefics.scoring.consistency import consistency_scores
    from med_idefics.scoring.reliance import reliance_scores

    pairs = [(f"q{i}", f"q{i + 2}") for i in range(0, N // 2, 4)]  # closed pairs whose truths agree: 5 of them
    extra = consistency_scores(sighted, pairs, 0, 1000) if suites[0] == "vqa-rad" else {}
    write_variant(root, variant, suites[0], sighted, extra)
    write_variant(root, variant, suites[1], blank, reliance_scores(sighted, blank, 0, 1000))


def test_report_and_compare_show_image_reliance_and_consistency(evaluated, params, monkeypatch):
    """results.md's Image reliance (with the paired test of the paper's variants and the gate's view on validation)
    and Consistency under rewording sections, each with n and intervals; compare's tables and --json the same."""
    from click.testing import CliRunner

    from med_idefics.cli.app import main

    write_robustness(evaluated, "two-stage", predicted(N // 2), blind(predicted(N // 2)))  # looks: 1.0 → 0.5
    write_robustness(evaluated, "single-stage", predicted(4), blind(predicted(4)))
    write_robustness(evaluated, "base", predicted(10), predicted(10))  # answers the same without the image
    write_robustness(evaluated, "two-stage", predicted(15), blind(predicted(15)), ("validation", "validation-blank"))
    build_report(params, out=evaluated / "reports" / "results.md")
    text = (evaluated / "reports" / "results.md").read_text()
    reliance = chapter(text, "Image reliance")
    # 10 closed questions right with the image and wrong without, none the other way: one-sided McNemar p = 1 / 2**10
    two = table_row(reliance, "two-stage", "20", "1.000")
    assert re.search(r"\| 0\.500 \[0\.\d\d, 0\.\d\d\] \| \+0\.500 \[\+0\.\d\d, \+0\.\d\d\] \| 0\.00098 \|", two), two
    assert two.endswith("| 1.000 [1.00, 1.00] (n = 20) | 0.500 |")  # yes to all under blank images; truth: half
    assert "| +0.000 [+0.00, +0.00] | 1 |" in table_row(reliance, "base", "20", "0.500")
    assert "**Yes** — does two-stage rely on the image more than base? Image reliance +0.500 vs +0.000" in reliance
    assert "does two-stage rely on the image more than single-stage?" in reliance
    gate = reliance.split("where promotion's gate looks")[1]
    assert "≥ 0.05 with p < 0.05" in gate and table_row(gate, "two-stage", "20", "0.750")
    consistency = chapter(text, "Consistency under rewording")
    assert table_row(consistency, "two-stage", "5", "1.000 [1.00, 1.00]", "1.000 [1.00, 1.00]")
    assert table_row(consistency, "base", "5")
    headline = json.loads((evaluated / "reports" / "headline.json").read_text())
    assert headline["two-stage"]["blank"] == {"closed": 0.5} and headline["two-stage"]["vqa-rad"]["consistent"] == 1.0
    assert "validation-blank" not in headline["two-stage"]  # the gate's numbers stay in its metrics file

    monkeypatch.setenv("COLUMNS", "80")
    shown = CliRunner().invoke(main, ["compare", "--all-metrics"], catch_exceptions=False).output
    assert max(map(len, shown.splitlines())) <= 80, shown
    assert "image reliance: vqa-rad − blank, strict closed, n = 20" in shown and "0.00098" in shown
    assert "image reliance: validation − validation-blank" in shown
    assert "vqa-rad, rewording pairs (n = 5)" in shown and "Both right" in shown
    as_json = json.loads(CliRunner().invoke(main, ["compare", "--json"], catch_exceptions=False).output)
    two = as_json["image_reliance"]["blank"]["two-stage"]
    assert (two["with_image"], two["without_image"], two["image_reliance"], two["n"]) == (1.0, 0.5, 0.5, 20)
    assert two["p_value"] == 2**-10 and two["yes_rate"] == 1.0 and two["truth_yes_rate"] == 0.5
    assert as_json["suites"]["vqa-rad"]["two-stage"]["consistency"] == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0,
                                                                        "n": 5}  # fmt: skip
