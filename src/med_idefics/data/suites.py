"""The evaluation suites: which records each one asks, with which image and which prompt prefix.

Every suite uses a *whole* split named in params (never a sample):

- ``vqa-rad``: the VQA eval split (``data.vqa.eval_split``) as it is;
- ``path-vqa``: the out-of-distribution split (``data.ood``);
- ``swap``: the VQA eval split, every question shown with a *different* image. The distinct images of the split
  (compared by their bytes; several questions share one image) are permuted by a seeded derangement — a permutation
  without fixed points — and each question gets the image its own image is mapped to. So no question keeps an
  identical image, questions about one image stay together on another one, and the same seed gives the same pairs;
- ``blank``: the VQA eval split, every image replaced by a black image of the same size
  (:func:`med_idefics.data.images.blank_like`): what a variant answers without looking. Black, because it is an empty
  field of view — radiographs, CT and MR are read on black, the importer composites transparent margins on black —
  and what a pipeline that loses its images (a field-name mismatch, a zeroed tensor) shows a model; any constant image
  carries no information about the question, whatever its value. Image reliance is accuracy with the image minus
  accuracy on ``blank`` (:mod:`med_idefics.scoring.reliance`);
- ``expert-prompt``: the VQA eval split with ``eval.expert_prompt`` in front of the usual prefix: the user turn reads
  ``<expert prompt> <data.prompt_prefix> <question>`` (the paper prepended its radiologist persona to the question);
- ``slake`` (only when asked for by name, once SLAKE is imported: ``med-idefics data slake``): SLAKE's test split,
  ``<data.root>/slake/test.parquet``, as it is; ``all`` leaves it out, so profiles without SLAKE data still run;
- ``validation`` (in ``all`` when ``data.vqa.validation_fraction`` > 0): the validation split carved from train by
  image (:mod:`med_idefics.data.splits`): what the registry promotes on (``registry.suite``), so a model is never chosen
  on test; ``validation-blank`` (in ``all`` with it): the same with blank images, on which promotion's gate checks that
  a candidate looks at the image (``registry.min_image_reliance``);
- ``med-halt``: the nonsense questions (``data.nonsense``; they have no image), each shown with an image drawn (seeded,
  with replacement) from the distinct images of the VQA eval split. Scored by abstention, not by answer overlap.

On ``vqa-rad`` and ``slake`` a suite also carries its rewording pairs (:mod:`med_idefics.data.rewordings`): the
questions asked twice in other words, on which consistency is scored.

Randomness comes from ``np.random.default_rng([eval.seed, <suite stream>])``: one stream per suite, so changing one
suite never reshuffles another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from med_idefics.config import ConfigError, Params
from med_idefics.data.images import blank_like
from med_idefics.data.rewordings import links, rewording_pairs
from med_idefics.data.schema import DatasetError, read_records
from med_idefics.data.splits import IMAGE_DISJOINT, load_vqa_splits, vqa_test

VQA_RAD, PATH_VQA, SWAP, EXPERT_PROMPT, MED_HALT = "vqa-rad", "path-vqa", "swap", "expert-prompt", "med-halt"
BLANK = "blank"
SUITES = (VQA_RAD, PATH_VQA, SWAP, BLANK, EXPERT_PROMPT, MED_HALT)  # `all`
VALIDATION, VALIDATION_BLANK = "validation", "validation-blank"  # in `all` only when the config carves validation
VALIDATION_SUITES = (VALIDATION, VALIDATION_BLANK)
SLAKE = "slake"
OPTIONAL_SUITES = (SLAKE,)  # by name only: they need data no profile imports by default
KNOWN_SUITES = (*SUITES, *VALIDATION_SUITES, *OPTIONAL_SUITES)  # every name parse_suites and load_suite accept
BLANKED = {BLANK: VQA_RAD, VALIDATION_BLANK: VALIDATION}  # a blank suite → the suite whose images it blanks
CONSISTENCY_SUITES = (VQA_RAD, SLAKE)  # the questions as they are: their rewording pairs are scored
SLAKE_DATASET, SLAKE_SPLIT = "slake", "test"  # where `med-idefics data slake` stores SLAKE's test questions
ALL = "all"
_STREAMS = {SWAP: 0, MED_HALT: 1}
_MAX_DERANGEMENT_TRIES = 10_000  # a uniform permutation is a derangement with probability ~1/e; never reached


@dataclass(frozen=True)
class Suite:
    name: str
    records: list[dict]  # schema records, each with image bytes
    prefix: str  # the prompt prefix before every question (prompts.user_text)
    pairs: tuple[tuple[str, str], ...] = ()  # (original id, rewording id): questions asked twice in other words
    blanks: str | None = None  # a blank suite: the suite whose questions it asks with blank images


def parse_suites(spec: str, validation: bool = False) -> list[str]:
    """``all`` → every suite (and ``validation`` when ``validation``: the config has a validation split); otherwise a
    comma-separated list of suite names."""
    if spec == ALL:
        return [*SUITES, *(VALIDATION_SUITES if validation else ())]
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in KNOWN_SUITES]
    if unknown or not names:
        raise ConfigError(f"unknown suite(s) {unknown or [spec]}; choose from {', '.join(KNOWN_SUITES)} or {ALL}")
    return list(dict.fromkeys(names))


def expert_prefix(expert_prompt: str, prompt_prefix: str) -> str:
    """The expert persona first, then the usual prefix: ``<expert> <prefix>``."""
    return " ".join(part.strip() for part in (expert_prompt, prompt_prefix) if part and part.strip())


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of ``range(n)`` with no fixed point (rejection sampling)."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    for _ in range(_MAX_DERANGEMENT_TRIES):
        permutation = rng.permutation(n)
        if not np.any(permutation == np.arange(n)):
            return permutation
    raise RuntimeError("no derangement found")  # probability ~(1 - 1/e)^10000: a bug, not bad luck


def distinct_images(records: Sequence[Mapping]) -> list[bytes]:
    """The records' images without repeats (by bytes), in order of first appearance."""
    return list(dict.fromkeys(r["image"] for r in records if r.get("image") is not None))


def swap_images(records: Sequence[Mapping], rng: np.random.Generator, where: str = "the split") -> list[dict]:
    """Each record with the image of a seeded derangement over the distinct images: never its own image's bytes."""
    missing = [r["id"] for r in records if r.get("image") is None]
    if missing:
        raise DatasetError(f"{where}: record(s) {missing[:5]} have no image; the swap suite needs one per question")
    images = distinct_images(records)
    if len(images) < 2:
        raise DatasetError(f"{where} has {len(images)} distinct image(s); the swap suite needs at least 2")
    target = dict(zip(images, (images[i] for i in derangement(len(images), rng)), strict=True))
    return [{**record, "image": target[record["image"]]} for record in records]


def blank_images(records: Sequence[Mapping]) -> list[dict]:
    """Each record with a black image of its own image's size (:func:`~med_idefics.data.images.blank_like`)."""
    return [{**record, "image": blank_like(record["image"])} for record in records]


def attach_images(records: Sequence[Mapping], images: Sequence[bytes], rng: np.random.Generator) -> list[dict]:
    """Each (image-less) record with an image drawn from ``images``, seeded, with replacement."""
    if not images:
        raise DatasetError("no images to show the nonsense questions with: the VQA eval split has none")
    picks = rng.integers(len(images), size=len(records))
    return [{**record, "image": images[int(i)]} for record, i in zip(records, picks, strict=True)]


def has_validation(params: Params) -> bool:
    """Whether the config carves a validation split (and so ``all`` includes the ``validation`` suite)."""
    return params.data.vqa.validation_fraction > 0


def suite_splits(params: Params, name: str) -> list[tuple[str, str]]:
    """The (dataset, split) pairs suite ``name`` reads: its questions first, then where its images come from."""
    data = params.data
    vqa_eval = (data.vqa.dataset, data.vqa.eval_split)
    vqa_train = (data.vqa.dataset, data.vqa.train_split)
    splits = {
        VALIDATION: [vqa_train, *([vqa_eval] if data.vqa.split == IMAGE_DISJOINT else [])],
        VQA_RAD: [vqa_eval],
        PATH_VQA: [(data.ood.dataset, data.ood.split)],
        SWAP: [vqa_eval],
        BLANK: [vqa_eval],
        EXPERT_PROMPT: [vqa_eval],
        MED_HALT: [(data.nonsense.dataset, data.nonsense.split), vqa_eval],
    }
    splits[VALIDATION_BLANK] = splits[VALIDATION]
    if name not in splits:
        raise ConfigError(f"unknown suite {name!r}; choose from {', '.join((*SUITES, *VALIDATION_SUITES))}")
    return splits[name]


def load_suite(params: Params, name: str) -> Suite:
    """The records and prefix of suite ``name`` from the splits params names (see the module docstring)."""
    data = params.data
    prefix = data.prompt_prefix
    if name in BLANKED:
        sighted = load_suite(params, BLANKED[name])
        return Suite(name, blank_images(sighted.records), sighted.prefix, blanks=sighted.name)

    def rng() -> np.random.Generator:
        return np.random.default_rng([params.eval.seed, _STREAMS[name]])

    def vqa_eval() -> list[dict]:
        return vqa_test(params)  # data.vqa.eval_split, or its image-disjoint re-split (data.vqa.split)

    if name == VQA_RAD:
        records = vqa_eval()
    elif name == PATH_VQA:
        records = read_records(data.root, data.ood.dataset, data.ood.split)
    elif name == SWAP:
        records = swap_images(vqa_eval(), rng(), where=f"{data.vqa.dataset}/{data.vqa.eval_split}")
    elif name == EXPERT_PROMPT:
        records, prefix = vqa_eval(), expert_prefix(params.eval.expert_prompt, prefix)
    elif name == VALIDATION:
        records = load_vqa_splits(params).validation
        if not has_validation(params):
            raise ConfigError(
                f"suite {VALIDATION}: data.vqa.validation_fraction is 0, so there is no validation split; set it > 0 "
                "(e.g. 0.1) or leave the suite out"
            )
        if not records:
            raise DatasetError(
                f"suite {VALIDATION}: data.vqa.validation_fraction {data.vqa.validation_fraction:g} of "
                f"{data.vqa.dataset}/{data.vqa.train_split} holds no whole image (an image's questions stay together); "
                "raise the fraction"
            )
    elif name == SLAKE:
        records = read_records(data.root, SLAKE_DATASET, SLAKE_SPLIT)
    elif name == MED_HALT:
        questions = read_records(data.root, data.nonsense.dataset, data.nonsense.split)
        records = attach_images(questions, distinct_images(vqa_eval()), rng())
    else:
        raise ConfigError(f"unknown suite {name!r}; choose from {', '.join(KNOWN_SUITES)}")
    if not records:
        raise DatasetError(f"suite {name}: its split has no records; check data.* in params.yaml")
    without_image = [r["id"] for r in records if r.get("image") is None]
    if without_image:
        raise DatasetError(f"suite {name}: record(s) {without_image[:5]} have no image; re-import the dataset")
    pairs = ()
    if name in CONSISTENCY_SUITES:
        dataset = SLAKE_DATASET if name == SLAKE else data.vqa.dataset
        pairs = tuple(rewording_pairs((r["id"] for r in records), links(data.root, dataset)))
    return Suite(name, records, prefix, pairs)
