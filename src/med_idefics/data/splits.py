"""Which VQA records train, validate and test: the official split, or an image-disjoint one; and a validation split.

VQA-RAD's official split is by question, not by image: 202 of its 203 test images also appear in training questions.
``data.vqa.split: image-disjoint`` pools the stored train and eval splits and re-splits them by image content (the
SHA-1 of the stored image, so two copies of one picture under different names stay together): the images, in an order
drawn from ``data.vqa.split_seed``, go to test while they fit in the official test size, so the test set keeps close
to its official size and no test image is seen in training. ``data.vqa.validation_fraction`` > 0 likewise holds out
that share of train's questions, by image, as a validation split for choosing a model without touching test; training
then uses train minus validation. Both keep a question and its rewordings together (:mod:`med_idefics.data.rewordings`:
one VQA-RAD training group spans two images, which then move as one).

:func:`split_name` is the one string that states which split was used (tagged on training and evaluation runs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from med_idefics.config import Params, VqaSource
from med_idefics.data.rewordings import Link, links
from med_idefics.data.schema import read_records

OFFICIAL, IMAGE_DISJOINT = "official", "image-disjoint"
TRAIN, VALIDATION, TEST = "train", "validation", "test"
_STREAMS = {IMAGE_DISJOINT: 0, VALIDATION: 1}  # one random stream per draw: changing one never moves the other


@dataclass(frozen=True)
class VqaSplits:
    name: str  # split_name(): which split these are
    train: list[dict]  # train minus validation
    validation: list[dict]  # empty when data.vqa.validation_fraction is 0
    test: list[dict]


def split_name(vqa: VqaSource) -> str:
    """``official`` or ``image-disjoint (seed S)``, plus ``; validation F of train by image (seed S)`` when enabled."""
    name = OFFICIAL if vqa.split == OFFICIAL else f"{IMAGE_DISJOINT} (seed {vqa.split_seed})"
    if vqa.validation_fraction > 0:
        name += f"; validation {vqa.validation_fraction:g} of train by image (seed {vqa.split_seed})"
    return name


def image_key(record: Mapping) -> str:
    """The record's image content hash; a record without an image is its own group."""
    image = record.get("image")
    return hashlib.sha1(image).hexdigest() if image is not None else f"no-image:{record['id']}"


def group_keys(records: Sequence[Mapping], found: Mapping[str, Link] | None = None) -> list[str]:
    """Each record's group: its image (:func:`image_key`), the images of linked questions (a question and its
    rewordings, ``found``) merged into one group named by its smallest image key — so without links every image is
    its own group, as before links were read."""
    keys = [image_key(record) for record in records]
    parent = {key: key for key in keys}

    def root(key: str) -> str:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    first_image: dict[str, str] = {}
    for record, key in zip(records, keys, strict=True):
        link = (found or {}).get(record["id"])
        if link is None:
            continue
        other = root(first_image.setdefault(link.group, key))
        mine = root(key)
        parent[max(mine, other)] = min(mine, other)
    return [root(key) for key in keys]


def take_by_image(
    records: Sequence[dict], size: int, rng: np.random.Generator, found: Mapping[str, Link] | None = None
) -> tuple[list[dict], list[dict]]:
    """(rest, taken): whole image groups (:func:`group_keys`), in a seeded order, go to ``taken`` while they fit in
    ``size`` records.

    Deterministic for a seed (groups are ordered by hash before shuffling); both lists keep the input order.
    """
    record_keys = group_keys(records, found)
    groups: dict[str, int] = {}
    for key in record_keys:
        groups[key] = groups.get(key, 0) + 1
    keys = sorted(groups)
    chosen, count = set(), 0
    for i in rng.permutation(len(keys)):
        if count + groups[keys[i]] <= size:
            chosen.add(keys[i])
            count += groups[keys[i]]
            if count == size:
                break
    taken = [r for r, key in zip(records, record_keys, strict=True) if key in chosen]
    rest = [r for r, key in zip(records, record_keys, strict=True) if key not in chosen]
    return rest, taken


def image_disjoint(
    train: Sequence[dict], test: Sequence[dict], seed: int, found: Mapping[str, Link] | None = None
) -> tuple[list[dict], list[dict]]:
    """Re-split train + test by image: no image on both sides, no rewording apart from its original (``found``); the
    new test has at most ``len(test)`` questions."""
    rng = np.random.default_rng([seed, _STREAMS[IMAGE_DISJOINT]])
    new_train, new_test = take_by_image([*train, *test], len(test), rng, found)
    return _relabel(new_train, TRAIN), _relabel(new_test, TEST)


def carve_validation(
    train: Sequence[dict], fraction: float, seed: int, found: Mapping[str, Link] | None = None
) -> tuple[list[dict], list[dict]]:
    """(train minus validation, validation): about ``fraction`` of train's questions, whole images (and a question
    with its rewordings, ``found``) only."""
    if fraction <= 0:
        return list(train), []
    rng = np.random.default_rng([seed, _STREAMS[VALIDATION]])
    rest, validation = take_by_image(train, round(fraction * len(train)), rng, found)
    return rest, _relabel(validation, VALIDATION)


def load_vqa_splits(params: Params, *, with_train: bool = True) -> VqaSplits:
    """The configured VQA dataset's train, validation and test records as training and evaluation use them.

    ``with_train=False`` (official split only) skips reading train when only test is wanted.
    """
    data, vqa = params.data, params.data.vqa
    test = read_records(data.root, vqa.dataset, vqa.eval_split)
    if not with_train and vqa.split == OFFICIAL:
        return VqaSplits(split_name(vqa), [], [], test)
    train = read_records(data.root, vqa.dataset, vqa.train_split)
    found = links(data.root, vqa.dataset)
    if vqa.split == IMAGE_DISJOINT:
        train, test = image_disjoint(train, test, vqa.split_seed, found)
    train, validation = carve_validation(train, vqa.validation_fraction, vqa.split_seed, found)
    return VqaSplits(split_name(vqa), train, validation, test)


def train_and_validation(params: Params) -> tuple[list[dict], list[dict]]:
    """(train, validation) records of the configured VQA dataset; validation is empty when it is not enabled."""
    splits = load_vqa_splits(params)
    return splits.train, splits.validation


def vqa_test(params: Params) -> list[dict]:
    """The test records every VQA evaluation suite asks (official, or the image-disjoint re-split)."""
    return load_vqa_splits(params, with_train=False).test


def _relabel(records: Sequence[dict], split: str) -> list[dict]:
    return [record if record.get("split") == split else {**record, "split": split} for record in records]
