"""How long each record is as the model trains on it, counted at import and kept in the split's parquet file.

A record's length is its training sequence under the base's processor: the chat template with question and answer,
the image's ``<image>`` tokens expanded (64 for Idefics2-8b), ``<end_of_utterance>`` — what
:class:`~med_idefics.data.collator.VqaCollator` pads a batch to. A batch costs memory in proportion to its micro-batch
times its longest member, so ``med-idefics estimate`` predicts a training stage's peak from the split's longest
record (:mod:`med_idefics.modeling.memory`). The statistics go into the file's key-value metadata under
:data:`METADATA_KEY` (written with the records, so they never describe other data) and are printed by the import.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from med_idefics.data.schema import split_path
from med_idefics.data.sources import VQA

METADATA_KEY = "med_idefics.token_lengths"
PERCENTILES = (50, 90, 99)
CHUNK = 256  # records tokenized together


class TokenCounter:
    """Counts the training-sequence length of records as they stream past, under one processor. ``name`` says
    which (a base's id and revision, or a folder), and goes with the statistics."""

    def __init__(self, processor, name: str, prompt_prefix: str = "") -> None:
        self.processor, self.name, self.prompt_prefix = processor, name, prompt_prefix

    def lengths(self, records: list[Mapping], prefix: str) -> list[int]:
        from med_idefics.data.collator import render_prompt

        texts = [render_prompt(self.processor, r["question"], prefix, r["answer"]) for r in records]
        return [len(ids) for ids in self.processor(text=texts)["input_ids"]]

    def counting(self, records: Iterable[Mapping], kind: str) -> tuple[Iterator[Mapping], SplitLengths]:
        """(``records``, passed through unchanged and counted on the way, the split's lengths once consumed);
        captions take no VQA prefix (their question is the caption prompt), text-only records are not counted."""
        lengths = SplitLengths(self.name)
        prefix = self.prompt_prefix if kind == VQA else ""

        def passing() -> Iterator[Mapping]:
            chunk: list[Mapping] = []
            for record in records:
                chunk.append(record)
                if len(chunk) == CHUNK:
                    yield from self._counted(chunk, prefix, lengths)
                    chunk = []
            yield from self._counted(chunk, prefix, lengths)

        return passing(), lengths

    def _counted(self, chunk: list[Mapping], prefix: str, lengths: SplitLengths) -> list[Mapping]:
        with_image = [r for r in chunk if r.get("image") is not None]
        if with_image:
            lengths.add([str(r["id"]) for r in with_image], self.lengths(with_image, prefix))
        return chunk


class SplitLengths:
    def __init__(self, tokenizer: str) -> None:
        self.tokenizer, self.ids, self.values = tokenizer, [], []

    def add(self, ids: list[str], lengths: list[int]) -> None:
        self.ids += ids
        self.values += lengths

    def stats(self) -> dict[str, Any] | None:
        """Count, percentiles, longest and which record it is; None when nothing was counted."""
        if not self.values:
            return None
        values = np.asarray(self.values)
        longest = int(values.argmax())
        stats = {"tokenizer": self.tokenizer, "count": len(values), "mean": round(float(values.mean()), 1)}
        stats |= {f"p{p}": int(np.percentile(values, p, method="higher")) for p in PERCENTILES}
        return stats | {"max": int(values[longest]), "longest_id": self.ids[longest]}

    def metadata(self) -> dict[str, str]:
        stats = self.stats()
        return {METADATA_KEY: json.dumps(stats)} if stats else {}


def describe(stats: Mapping[str, Any] | None) -> str:
    """One line for the import's summary."""
    if not stats:
        return "token lengths: not counted"
    shown = " · ".join(f"p{p} {stats[f'p{p}']:,}" for p in PERCENTILES)
    return (
        f"training sequence tokens ({stats['tokenizer']}): {shown} · max {stats['max']:,} "
        f"(record {stats['longest_id']}) over {stats['count']:,} records"
    )


def read_lengths(root: str | Path, dataset: str, split: str) -> dict[str, Any] | None:
    """The split's statistics as its import stored them (the parquet footer only), or None (not imported, or
    imported without a processor to count with)."""
    path = split_path(root, dataset, split)
    if not path.is_file():
        return None
    raw = (pq.ParquetFile(path).metadata.metadata or {}).get(METADATA_KEY.encode())
    return json.loads(raw) if raw else None
