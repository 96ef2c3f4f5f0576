"""The ``base`` stage as a tracked MLflow run named ``base (seed <seed>)``: the row of the MLflow runs table that the
bare base's evaluations attach to (nested runs, and ``<suite>/<metric>`` headline metrics), as a training run is for an
adapter.

:func:`build_tracked_base` runs :func:`med_idefics.modeling.bases.build_base` inside the run and records where the base
came from:

- a hub model: tags ``base.hub_id`` and ``base.revision`` (the commit the revision resolved to);
- a local folder: tag ``base.path`` and ``base.sha256`` over its files;
- the tiny base built here: its params (logged with every run), ``base.sha256`` over the saved model and processor,
  the pretraining numbers as ``pretrain/<name>`` metrics, and the splits it learned from as dataset inputs.

The run id goes to ``<base_dir>-run/run_info.json`` (:func:`med_idefics.reporting.results.base_run_folder`: beside the
base, so that a rerun leaves the base folder, a DVC output, byte-identical), where the evaluation of ``base`` finds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from med_idefics.config import Params
from med_idefics.reporting.results import base_run_folder, write_run_info

VARIANT = "base"


def build_tracked_base(params: Params, base_dir: str | Path | None = None, dvc_stage: str | None = None) -> dict:
    """:func:`med_idefics.modeling.bases.build_base` as the MLflow run ``base``; returns what ``build_base`` returns."""
    from med_idefics.modeling.bases import TINY, build_base
    from med_idefics.tracking.runs import seeded_run_name, tracked_run

    out = Path(base_dir or params.model.base_dir)
    source = TINY if params.model.base == TINY else None
    run_name = seeded_run_name(VARIANT, params.seed)
    with tracked_run(params, run_name, tags={"variant": VARIANT}, dvc_stage=dvc_stage) as run:
        result = build_base(params, out)
        source = source or result["source"]
        if run is not None:
            _log_provenance(params, out, source, result)
        run_id = run.info.run_id if run is not None else None
        record = base_run_folder(out)
        record.mkdir(parents=True, exist_ok=True)
        write_run_info(record, {"variant": VARIANT, "source": source, "run_id": run_id})
    return result


def base_tags(source: str, base_dir: Path, result: dict[str, Any]) -> dict[str, str]:
    """The provenance tags of a resolved or built base (see the module docstring)."""
    from med_idefics.files import folder_sha256

    tags = {"base.source": source}
    if source == "hub":
        return tags | {"base.hub_id": result["id"], "base.revision": result["revision"]}
    if source == "local":  # hashed once, by the base stage (its pointer carries it)
        return tags | {"base.path": str(result["path"]), "base.sha256": result["sha256"]}
    return tags | {"base.sha256": folder_sha256(base_dir)}


def _log_provenance(params: Params, base_dir: Path, source: str, result: dict[str, Any]) -> None:
    import mlflow

    from med_idefics.modeling.bases import TINY
    from med_idefics.tracking.runs import log_split_inputs

    mlflow.set_tags(base_tags(source, base_dir, result))
    if source != TINY:
        return
    numbers = {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    mlflow.log_metrics({f"pretrain/{k}": float(v) for k, v in numbers.items()})
    data = params.data
    log_split_inputs(data.root, [(data.captions.dataset, data.captions.train_split)], "training")
    log_split_inputs(data.root, [(data.vqa.dataset, data.vqa.train_split)], "training")  # the tokenizer's words
    log_split_inputs(data.root, [(data.captions.dataset, data.captions.eval_split)], "validation")
