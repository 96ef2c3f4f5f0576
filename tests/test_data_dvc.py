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


def test_dvc_add_links_the_data_into_its_cache_instead_of_copying_it(repo_root, tmp_path, monkeypatch):
    """Every `med-idefics data …` ends with `dvc add data`: with DVC's default cache type (reflink where the file
    system has it, else copy) tens of GB of ROCO would be copied into .dvc/cache, more than a 64 GB disk holds. The
    project's .dvc/config hard-links them: one copy of the bytes on disk, none made."""
    import os

    from med_idefics.data.schema import write_splits
    from med_idefics.data.versioning import dvc_track

    monkeypatch.chdir(tmp_path)
    Repo.init(str(tmp_path), no_scm=True)
    shutil.copy(repo_root / ".dvc" / "config", tmp_path / ".dvc" / "config")
    (tmp_path / ".dvc" / "config.local").write_text("[core]\n    no_scm = true\n")
    records = [{"id": "r0", "image": os.urandom(4096), "question": "q", "answer": "a", "answer_type": "open",
                "dataset": "big", "split": "train"}]  # fmt: skip
    write_splits(tmp_path / "data", "big", {"train": records})
    stored = tmp_path / "data" / "big" / "train.parquet"
    inode = os.stat(stored).st_ino
    dvc_track(tmp_path / "data")
    content = stored.read_bytes()
    (cached,) = [p for p in (tmp_path / ".dvc" / "cache").rglob("*") if p.is_file() and p.read_bytes() == content]
    assert os.stat(cached).st_ino == os.stat(stored).st_ino == inode  # the imported file itself, linked: no copy


def test_re_importing_one_split_links_the_others_instead_of_copying_them(tmp_path):
    import os

    from med_idefics.data.schema import read_records, write_splits

    record = {"id": "r0", "image": None, "question": "q", "answer": "a", "answer_type": "open", "dataset": "d"}
    write_splits(tmp_path, "d", {"train": [record | {"split": "train"}], "test": [record | {"split": "test"}]})
    before = os.stat(tmp_path / "d" / "test.parquet").st_ino
    write_splits(tmp_path, "d", {"train": [record | {"split": "train", "answer": "b"}]})
    assert os.stat(tmp_path / "d" / "test.parquet").st_ino == before
    assert read_records(tmp_path, "d", "train")[0]["answer"] == "b" and len(read_records(tmp_path, "d", "test")) == 1
