"""The demo must show the science works: checked on the outputs of the demo pipeline by `make demo-check`, the last
step of `make demo`; `make test` deselects it, since a fresh clone has no pipeline outputs. A missing metrics file
fails."""

import json

import pytest

pytestmark = pytest.mark.demo


def _metrics(repo_root, variant: str, suite: str) -> dict:
    path = repo_root / "metrics" / variant / f"{suite}.json"
    assert path.is_file(), f"{path} missing: run `make demo` (dvc repro) first"
    return json.loads(path.read_text())


def test_two_stage_beats_the_base_by_20_points_of_closed_accuracy(repo_root):
    two_stage = _metrics(repo_root, "two-stage", "vqa-rad")["closed_accuracy"]
    base = _metrics(repo_root, "base", "vqa-rad")["closed_accuracy"]
    assert two_stage >= base + 0.20, f"two-stage {two_stage:.3f} vs base {base:.3f}"


def test_swapping_images_costs_at_least_15_points(repo_root):
    plain = _metrics(repo_root, "two-stage", "vqa-rad")["closed_accuracy"]
    swapped = _metrics(repo_root, "two-stage", "swap")["closed_accuracy"]
    assert swapped <= plain - 0.15, f"swap {swapped:.3f} vs plain {plain:.3f}"


def test_stage2_training_loss_fell(repo_root):
    summary = json.loads((repo_root / "outputs/two-stage/train_summary.json").read_text())
    assert summary["last_loss"] < summary["first_loss"]


def test_the_pipeline_is_up_to_date(repo_root, monkeypatch):
    from dvc.repo import Repo

    monkeypatch.chdir(repo_root)
    with Repo(str(repo_root)) as repo:
        assert repo.status() == {}
