"""Questions asked twice in other words: the link between a question and its rewordings, and the pairs that
consistency under rewording is measured on (:mod:`med_idefics.scoring.consistency`).

VQA-RAD's release marks them. Every question has a ``qid_linked_id``: questions that share one were written about one
image as one question and its rewordings. Its ``phrase_type`` says which: ``freeform`` (train) or ``test_freeform``
(test) for a clinician's own question, ``para`` or ``test_para`` for a rewording of it. The importer keeps both
columns (:data:`LINKED_ID`, :data:`PHRASE_TYPE`; :mod:`med_idefics.data.releases`), and the demo writes them in
VQA-RAD's vocabulary, as it writes its question types in VQA-RAD's codes. SLAKE marks none (its Chinese rows are
translations into another language, not rewordings in one), nor does PathVQA.

A *pair* is an original and one of its rewordings: each rewording of a group with exactly one original. A group of
several originals does not say which one a rewording rewords (VQA-RAD's ``question_rephrase`` names another rewording
as often as an original there), and a group of originals only holds different questions about one image.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

LINKED_ID, PHRASE_TYPE = "qid_linked_id", "phrase_type"
REWORDING_PHRASES = frozenset({"para", "test_para"})  # the rest (freeform, test_freeform) are originals


@dataclass(frozen=True)
class Link:
    group: str  # the linked id its original and rewordings share
    rewording: bool


def links(root: str | Path, dataset: str) -> dict[str, Link]:
    """record id → its :class:`Link`, over every split of ``dataset`` that has both columns (only those three columns
    are read); ``{}`` when none has them. A record without a linked id has no link."""
    found: dict[str, Link] = {}
    for path in sorted(Path(root, dataset).glob("*.parquet")):
        if not {LINKED_ID, PHRASE_TYPE} <= set(pq.read_schema(path).names):
            continue
        table = pq.read_table(path, columns=["id", LINKED_ID, PHRASE_TYPE])
        for record_id, group, phrase in zip(*(table[c].to_pylist() for c in table.column_names), strict=True):
            if group is not None and str(group).strip():
                found[record_id] = Link(str(group).strip(), str(phrase or "").strip() in REWORDING_PHRASES)
    return found


def rewording_pairs(ids: Iterable[str], found: Mapping[str, Link]) -> list[tuple[str, str]]:
    """(original id, rewording id) for each rewording among ``ids`` whose group has exactly one original among
    ``ids``, in the order the rewordings come."""
    ids = list(ids)
    originals: dict[str, list[str]] = defaultdict(list)
    for record_id in ids:
        link = found.get(record_id)
        if link is not None and not link.rewording:
            originals[link.group].append(record_id)
    pairs = []
    for record_id in ids:
        link = found.get(record_id)
        if link is not None and link.rewording and len(originals.get(link.group, ())) == 1:
            pairs.append((originals[link.group][0], record_id))
    return pairs
