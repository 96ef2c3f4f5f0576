"""Keep ``data.dvc`` in step with ``data/``: every ``med-idefics data …`` command ends with ``dvc add data``."""

from __future__ import annotations

from pathlib import Path


def dvc_track(data_root: str | Path) -> str | None:
    """``dvc add`` the data folder when inside a DVC repo; return the new md5 (None outside a DVC repo)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    data_root = Path(data_root).resolve()
    try:
        repo = Repo(str(data_root.parent))
    except NotDvcRepoError:
        return None
    with repo:
        repo.add([str(data_root)])
    import yaml

    dvc_file = data_root.with_suffix(".dvc") if data_root.suffix else data_root.parent / f"{data_root.name}.dvc"
    return yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
