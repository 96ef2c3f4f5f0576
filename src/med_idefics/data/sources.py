"""The real datasets' sources and their schemas, and reading one split of one from the hub or from local files.

A source is a hub id, a release in its authors' own format (:mod:`med_idefics.data.releases`), or a local copy in
the hub's schema: a folder laid out like the hub repository
(``data/train-00000-of-00001.parquet``, ``test.jsonl``, an image folder with ``metadata.jsonl``, …) or a single
``.parquet`` / ``.json`` / ``.jsonl`` / ``.csv`` file holding one split. Everything is read with ``datasets`` in
streaming mode (nothing cached, a ``--limit`` reads only what it keeps), images undecoded so that a corrupt one is
rejected by its record instead of aborting the import. The hub token, if any, comes from ``$HF_TOKEN`` only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Imports stay light here (the CLI reads SOURCES for its help); datasets and the schema load when a split is opened.
VQA, CAPTION, TEXT = "vqa", "caption", "text"
LOCAL_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


@dataclass(frozen=True)
class SourceSpec:
    name: str  # the dataset's folder under data/
    hub_id: str | None  # None: only its authors' release is supported (--source)
    kind: str  # vqa | caption | text: how a row becomes a record (med_idefics.data.importers)
    required: tuple[str, ...]  # columns every split must have
    splits: tuple[str, ...] = ()  # source splits, stored under the same names
    config: str | None = None  # default hub config
    config_split: str | None = None  # set: the config's one source split, stored under the config's name

    def plan(self, splits: tuple[str, ...] | None = None, config: str | None = None) -> dict[str, str]:
        """Stored split → source split."""
        from med_idefics.data.schema import DatasetError

        if self.config_split is not None:
            if splits:
                raise DatasetError(f"{self.name} stores one split per config, named after it; pass a config instead")
            return {config or self.config: self.config_split}
        return {split: split for split in (splits or self.splits)}


_SPLITS_3 = ("train", "validation", "test")
SOURCES = {
    spec.name: spec
    for spec in (
        SourceSpec("vqa-rad", "flaviagiammarino/vqa-rad", VQA, ("image", "question", "answer"), ("train", "test")),
        SourceSpec("path-vqa", "flaviagiammarino/path-vqa", VQA, ("image", "question", "answer"), _SPLITS_3),
        SourceSpec("slake", None, VQA, ("image", "question", "answer"), _SPLITS_3),
        SourceSpec("roco", "eltorio/ROCO-radiology", CAPTION, ("image", "image_id", "caption"), _SPLITS_3),
        SourceSpec(
            "med-halt",
            "openlifescienceai/Med-HALT",
            TEXT,
            (
                "question",
                "options",
            ),  # the answer: correct_answer, options[correct_index], or the "I do not know" option
            config="reasoning_fake",
            config_split="train",  # each Med-HALT config is one "train" split
        ),
    )
}


@dataclass
class SourceSplit:
    """One split of a source, opened but not yet read."""

    where: str  # names the source and split in messages
    columns: list[str]
    rows: Iterator[dict]
    base_dir: Path | None  # relative image paths resolve here
    extra_columns: tuple[str, ...] = ()  # source columns kept in the records as extra string columns
    image_uses: dict[str, int] | None = None  # image file → questions using it, when known up front (releases)


def hf_token() -> str | bool:
    """``$HF_TOKEN`` or False (anonymous): never a token cached on disk by some other tool."""
    return os.environ.get("HF_TOKEN") or False


def is_local_file(source: str) -> bool:
    return Path(source).is_file()


def open_split(source: str, split: str, config: str | None = None, image_column: str | None = None) -> SourceSplit:
    """Open ``split`` of ``source`` (hub id, folder or file); raise :class:`DatasetError` naming it when unreadable."""
    from med_idefics.data.schema import DatasetError

    path = Path(source).resolve() if Path(source).exists() else Path(source)  # files listed below are absolute
    if path.is_dir() and config and (path / config).is_dir():  # a local clone with one folder per config (Med-HALT)
        path = path / config
    where = str(path) if path.exists() else _hub_where(source, config, split)
    try:
        where, base_dir, dataset = _load(source, path, split, config)
        dataset, columns, first = _undecoded(dataset, image_column)
    except DatasetError:
        raise
    except Exception as err:  # missing split, offline hub, unparsable file: all the user's to fix
        raise DatasetError(f"{where}: could not be read: {type(err).__name__}: {err}") from err
    return SourceSplit(where, columns, _guarded(where, dataset, first), base_dir)


def _load(source: str, path: Path, split: str, config: str | None):
    """(where, base_dir, streaming dataset) for one split."""
    import datasets

    from med_idefics.data.schema import DatasetError

    if path.is_dir():  # each split loaded from its own files, so a column missing in one split is named as such
        builder = datasets.load_dataset_builder(str(path))
        data_files = {str(name): list(files) for name, files in (builder.config.data_files or {}).items()}
        if split not in data_files:
            raise DatasetError(f"{path}: no files for split {split!r}; it holds split(s) {sorted(data_files)}")
        files = data_files[split]
        named = [str(Path(f).relative_to(path)) for f in files if Path(f).suffix.lower() in LOCAL_BUILDERS]
        where = f"{path} (split {split}: {', '.join(named[:3])}{', …' if len(named) > 3 else ''})"
        if all(Path(f).suffix.lower() == ".parquet" for f in files):
            return where, path, ParquetRows([Path(f) for f in files])
        return where, path, datasets.load_dataset(builder.name, data_files=files, split="train", streaming=True)
    if path.is_file():
        builder = LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DatasetError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_BUILDERS)} or a folder")
        if builder == "parquet":
            return str(path), path.parent, ParquetRows([path])
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
        return str(path), path.parent, dataset
    if path.suffix.lower() in LOCAL_BUILDERS or source.startswith((".", "/", "~")):
        raise DatasetError(f"{source}: no such file or folder; pass an existing path or a hub id to --source")
    dataset = datasets.load_dataset(source, name=config, split=split, streaming=True, token=hf_token())
    return _hub_where(source, config, split), None, dataset


class ParquetRows:
    """Local parquet files read row by row with pyarrow, a few rows at a time, images left as their ``{bytes, path}``
    structs (undecoded). ``datasets``' streaming reader pre-buffers whole files: a 55,000-record ROCO import held
    every image in memory that way (benchmarks/import_memory.py)."""

    features = None  # nothing to cast: pyarrow never decodes images
    BATCH_ROWS = 64

    def __init__(self, files: list[Path]) -> None:
        import pyarrow.parquet as pq

        self.files = files
        self.column_names = list(pq.read_schema(files[0]).names)

    def __iter__(self) -> Iterator[dict]:
        import pyarrow.parquet as pq

        for file in self.files:
            for batch in pq.ParquetFile(file, pre_buffer=False).iter_batches(batch_size=self.BATCH_ROWS):
                yield from batch.to_pylist()


def _hub_where(source: str, config: str | None, split: str) -> str:
    return f"hub dataset {source} ({f'config {config}, ' if config else ''}split {split})"


def _undecoded(dataset, image_column: str | None):
    """Switch off image decoding, and find the column names (reading the first row when the format has no schema)."""
    import datasets

    features = dataset.features
    if image_column and features is not None and isinstance(features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if dataset.column_names is not None:
        return dataset, list(dataset.column_names), None
    first = next(iter(dataset), None)
    return dataset, list(first or ()), first


def _guarded(where: str, dataset, first: dict | None) -> Iterator[dict]:
    """The rows, with a read error mid-way turned into a :class:`DatasetError` that names the source."""
    from med_idefics.data.schema import DatasetError

    count = 0
    try:
        iterator = iter(dataset)
        if first is not None:
            next(iterator)  # already read to learn the columns
            yield first
            count = 1
        for row in iterator:
            yield row
            count += 1
    except Exception as err:
        raise DatasetError(f"{where}: reading failed after {count} rows: {type(err).__name__}: {err}") from err
