"""The committed data.dvc is exactly what `med-idefics data demo` generates from the committed params.yaml."""

import shutil

import yaml
from click.testing import CliRunner
from dvc.repo import Repo

from med_idefics.cli import main


def test_demo_data_matches_committed_data_dvc(repo_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Repo.init(str(tmp_path), no_scm=True)
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(repo_root / "data.dvc", tmp_path / "data.dvc")
    committed = yaml.safe_load((repo_root / "data.dvc").read_text())["outs"][0]["md5"]

    result = CliRunner().invoke(main, ["data", "demo"])
    assert result.exit_code == 0, result.output

    assert yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]["md5"] == committed
    with Repo(str(tmp_path)) as repo:
        assert repo.status(targets=["data.dvc"]) == {}
    assert sorted(p.name for p in (tmp_path / "data" / "demo").iterdir()) == [
        "caption-train.parquet",
        "caption-validation.parquet",
        "general-validation.parquet",
        "general.parquet",
        "nonsense.parquet",
        "pathology.parquet",
        "test.parquet",
        "train.parquet",
    ]
