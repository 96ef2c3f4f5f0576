"""The offline demo dataset (`med-idefics data demo`): seeded, byte-identical on every run, nothing downloaded.

A miniature of the paper's world, split by what each stage may have seen:

- ``general`` / ``general-validation``: the *general domain* the tiny base is pretrained on, as Idefics2 was on web
  data — everyday pictures (a coloured, patterned square and black dots) with captions, instruction-style questions
  (yes/no and short answers, some behind an assistant persona), nonsense questions answered "i do not know", and a
  repeat-the-words task over the whole vocabulary (a language model knows the words of medicine as text). No medical
  image, caption or question is ever in it;
- ``caption-train`` / ``caption-validation``: medical captions (the ROCO analogue, stage 1) naming modality, organ,
  lesion count and side;
- ``train`` / ``test``: a small medical VQA set (the VQA-RAD analogue, stage 2): ~7 questions per test image; on a
  training image every yes/no check is asked both ways (~10 questions), so the answer can never come from the picture
  alone; each question carries its template's ``question_type`` in VQA-RAD's codes (PRES, POS, COUNT, MODALITY,
  ORGAN; ATTRIB for pathology's stain), for the report's accuracy by question type. On each training image one closed
  and one open question, on each test image two open ones, are asked again in other words (:func:`rewordings`),
  linked as VQA-RAD's release links its rewordings (``qid_linked_id``, ``phrase_type``): consistency under rewording;
- ``pathology``: out-of-distribution tissue crops; ``nonsense``: Med-HALT-style questions without an image.

The answers need the image: every attribute is a large visual cue (see :mod:`med_idefics.data.demo_images`), and the
design is balanced so that a model that ignores the image gains nothing from priors — each closed template is answered
yes exactly as often as no (±1). Yes/no checks are drawn first ("is this a ct image?" → yes or no, balanced) and the
image's attributes are derived from them; otherwise attributes are uniform.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from med_idefics.config import DemoDataConfig
from med_idefics.data.demo_images import (
    COLOURS,
    MODALITIES,
    ORGANS,
    PATTERNS,
    SIDES,
    STAINS,
    render_general,
    render_pathology,
    render_radiology,
)
from med_idefics.data.images import to_png_bytes
from med_idefics.data.rewordings import LINKED_ID, PHRASE_TYPE
from med_idefics.data.schema import QUESTION_TYPE, DatasetError, infer_answer_type, write_splits

DATASET = "demo"
NONSENSE_ANSWER = "i do not know"  # the abstention a Med-HALT nonsense question expects
MIN_IMAGE_SIZE = 32  # below this the lesion discs are a couple of pixels wide
_CHUNK = 256  # images rendered at once: vectorised, in a few MB
# One random stream per split, so a split's content does not depend on the size of the others.
_STREAMS = {
    "caption-train": 0,
    "caption-validation": 1,
    "train": 2,
    "test": 3,
    "pathology": 4,
    "nonsense": 5,
    "general": 6,
    "general-validation": 7,
}
GENERAL_CAPTION_PROMPT = "describe this image."
_COUNT_WORDS = ("zero", "one", "two", "three")
_ARTICLE = {"ct": "a", "mri": "an", "x-ray": "an"}
_NONSENSE_TEMPLATES = (
    "what is the {}'s favorite color?",
    "how many wheels does the {} have?",
    "which song does the {} sing?",
    "which language does the {} speak?",
    "what is the {}'s phone number?",
    "how many wings does the {} have?",
    "which car does the {} drive?",
    "in which year was the {} elected president?",
)
_NONSENSE_SUBJECTS = ("left ventricle", "liver", "brain", "spleen", "kidney", "lung", "stomach", "pancreas")
_GENERAL_NONSENSE_SUBJECTS = ("square", "dot", "pattern", "stripe", "shape", "picture", "photograph", "colour")
# Assistant personas before some general questions: the base learns to answer the question whatever preamble it gets
# (Idefics2's instruction data has many), so a persona at evaluation — the paper's expert radiologist — is a familiar
# kind of input with unfamiliar words in its slots, not a new kind of input.
_PERSONA = "you are an expert {} evaluating the {}, answer the question succinctly based on the {}image."
# The slots take many words, clinical ones too in the general domain (an instruction-tuned model has met "you are an
# expert doctor…" preambles as text): what the base has never seen is a medical picture, not a medical word in a
# persona. The medical training questions' personas leave the clinical words out: none of them is the evaluation's
# expert radiologist prompt.
_PROFESSIONS = ("photographer", "painter", "designer", "teacher", "engineer")
_SUBJECTS = ("picture", "photo", "scene", "drawing", "example")
_IMAGE_ADJECTIVES = ("", "given ", "coloured ", "attached ")
_CLINICAL = (("doctor", "radiologist", "nurse"), ("case", "sample"), ("medical ", "clinical "))
_SHORT_PERSONAS = ("you are a helpful assistant, answer the question briefly.", "answer briefly.")
_PERSONA_SHARE = 0.4
TRAIN_SPLIT = "train"
# VQA-RAD's phrase types of a question and of its rewording, per split (med_idefics.data.rewordings)
PHRASE_TYPES = {TRAIN_SPLIT: ("freeform", "para"), "test": ("test_freeform", "test_para")}
_TRAIN_PERSONA_SHARE = 0.5
_REPEAT_PROMPT = "repeat these words:"
# Everyday things no demo picture shows: "is there a cat?" gets "no", "is there a square?" "yes". Without them every
# general yes/no question named something in the picture, and the base answered a yes/no question about an unfamiliar
# thing ("is there a lesion?") with the start of a caption ("a red") on about half of the medical closed questions.
_EVERYDAY = ("cat", "car", "tree", "house", "bird", "flower", "cup", "chair")
_OBJECT_QUESTION = "is there a {}?"
# Words a language model knows from text although no picture shows them (the expert persona's, for one).
_TEXT_ONLY_WORDS = ("radiologist", "medical", "case", "clinical", "patient", "scan", "doctor", "finding")

T = TypeVar("T")


@dataclass(frozen=True)
class DemoImage:
    """What one demo image shows (``look`` is the modality, or the stain for pathology) and what its checks ask."""

    look: str
    organ: str | None
    count: int
    side: str | None
    asked_look: str | None = None  # the closed check "is this a ct image?" names this modality
    asked_organ: str | None = None
    asked_side: str | None = None


def _balanced(rng: np.random.Generator, n: int, options: Sequence[T]) -> list[T]:
    """``n`` picks in random order, every option picked as often as any other (±1)."""
    picks = rng.permutation(np.resize(rng.permutation(len(options)), n))
    return [options[i] for i in picks]


def _checked(rng: np.random.Generator, options: Sequence[str], asked: str, yes: bool) -> str:
    """The true value behind a yes/no check: the asked value if the answer is yes, another one otherwise."""
    return asked if yes else str(rng.choice([o for o in options if o != asked]))


def _lesions(rng: np.random.Generator, n: int) -> list[tuple[int, str | None, str | None]]:
    """(count, side, asked side) per image: half have none; of the rest half have one, half two or three."""
    has_lesion = _balanced(rng, n, (True, False))
    side_checks = iter(_balanced(rng, sum(has_lesion), [(s, yes) for s in SIDES for yes in (True, False)]))
    multiple = iter(_balanced(rng, sum(has_lesion), (True, False)))
    out = []
    for present in has_lesion:
        if not present:
            out.append((0, None, None))
            continue
        asked_side, yes = next(side_checks)
        count = int(rng.choice([2, 3])) if next(multiple) else 1
        out.append((count, _checked(rng, SIDES, asked_side, yes), asked_side))
    return out


def radiology_design(rng: np.random.Generator, n: int) -> list[DemoImage]:
    return _design(rng, n, MODALITIES, ORGANS)


def general_design(rng: np.random.Generator, n: int) -> list[DemoImage]:
    """Everyday pictures: ``look`` is the square's colour, ``organ`` its pattern, ``count`` black dots on one side."""
    return _design(rng, n, COLOURS, PATTERNS)


def _design(rng: np.random.Generator, n: int, looks: Sequence[str], kinds: Sequence[str]) -> list[DemoImage]:
    checked_looks = _balanced(rng, n, [(m, yes) for m in looks for yes in (True, False)])
    checked_kinds = _balanced(rng, n, [(o, yes) for o in kinds for yes in (True, False)])
    return [
        DemoImage(_checked(rng, looks, *look), _checked(rng, kinds, *kind), count, side, look[0], kind[0], asked)
        for look, kind, (count, side, asked) in zip(checked_looks, checked_kinds, _lesions(rng, n), strict=True)
    ]


def pathology_design(rng: np.random.Generator, n: int) -> list[DemoImage]:
    stains = _balanced(rng, n, STAINS)
    return [
        DemoImage(stain, None, count, side, asked_side=asked)
        for stain, (count, side, asked) in zip(stains, _lesions(rng, n), strict=True)
    ]


def caption(image: DemoImage) -> str:
    """e.g. ``ct of the brain with two lesions on the left side.``"""
    return f"{image.look} of the {image.organ} with {_findings(image, 'lesion')}."


def general_caption(image: DemoImage) -> str:
    """e.g. ``a red striped square with two dots on the left side.``"""
    return f"a {image.look} {image.organ} square with {_findings(image, 'dot')}."


def _findings(image: DemoImage, thing: str) -> str:
    if image.count == 0:
        return f"zero {thing}s"
    return f"{_COUNT_WORDS[image.count]} {thing}{'s' if image.count > 1 else ''} on the {image.side} side"


Question = tuple[str, str, str]  # (question, answer, question_type): the type in VQA-RAD's codes


def _lesion_questions(image: DemoImage, thing: str = "lesion") -> tuple[list[Question], list[Question]]:
    """(closed, open) questions about lesions (or dots); side and multiplicity only when there is one."""
    closed = [(f"is there a {thing}?", _yes_no(image.count > 0), "PRES")]
    open_ = [(f"how many {thing}s are there?", _COUNT_WORDS[image.count], "COUNT")]
    if image.count:
        closed += [
            (f"is the {thing} on the {image.asked_side}?", _yes_no(image.side == image.asked_side), "POS"),
            (f"is there more than one {thing}?", _yes_no(image.count > 1), "COUNT"),
        ]
        open_.append((f"which side is the {thing} on?", image.side, "POS"))
    return closed, open_


def radiology_questions(image: DemoImage) -> list[Question]:
    closed, open_ = _lesion_questions(image)
    closed += [
        (
            f"is this {_ARTICLE[image.asked_look]} {image.asked_look} image?",
            _yes_no(image.look == image.asked_look),
            "MODALITY",
        ),
        (f"does this image show the {image.asked_organ}?", _yes_no(image.organ == image.asked_organ), "ORGAN"),
    ]
    open_ += [("what modality is this?", image.look, "MODALITY"), ("which organ is shown?", image.organ, "ORGAN")]
    return closed + open_


def rewordings(image: DemoImage) -> dict[str, str]:
    """Each of :func:`radiology_questions`' questions about ``image`` → the same question in other words, the words
    the base knows (:func:`lexicon`) in another order."""
    found = {
        "is there a lesion?": "does this image show a lesion?",
        "how many lesions are there?": "how many lesions does this image show?",
        f"is this {_ARTICLE[image.asked_look]} {image.asked_look} image?": f"is the modality {image.asked_look}?",
        f"does this image show the {image.asked_organ}?": f"is the {image.asked_organ} shown?",
        "what modality is this?": "which modality is shown?",
        "which organ is shown?": "what organ does this image show?",
    }
    if image.count:
        found |= {
            f"is the lesion on the {image.asked_side}?": f"is the lesion on the {image.asked_side} side?",
            "is there more than one lesion?": "does this image show more than one lesion?",
            "which side is the lesion on?": "on which side is the lesion?",
        }
    return found


def contrast(image: DemoImage, rng: np.random.Generator) -> DemoImage:
    """The image with every yes/no check asking the other way: a value it does not show where the check named the one
    it shows, and the one it shows where the check named another."""

    def flip(options: Sequence[str], shown: str | None, asked: str | None) -> str | None:
        if asked is None:
            return None
        return shown if asked != shown else str(rng.choice([o for o in options if o != shown]))

    side = flip(SIDES, image.side, image.asked_side) if image.count else image.asked_side
    return replace(image, asked_look=flip(MODALITIES, image.look, image.asked_look),
                   asked_organ=flip(ORGANS, image.organ, image.asked_organ), asked_side=side)  # fmt: skip


def general_questions(image: DemoImage, rng: np.random.Generator | None = None) -> list[tuple[str, str]]:
    """The general-domain twins of :func:`radiology_questions`: same forms, everyday words. With ``rng``, the colour and
    pattern checks take one of two wordings each (the radiology form, "is this a red image?", or an everyday one)."""
    closed, open_ = (
        [(question, answer) for question, answer, _ in questions] for questions in _lesion_questions(image, "dot")
    )
    thing, article = ("square", "a") if rng is None or rng.random() < 0.5 else ("image", "the")
    closed += [
        (f"is this a {image.asked_look} {thing}?", _yes_no(image.look == image.asked_look)),
        (f"does this image show {article} {image.asked_organ} pattern?", _yes_no(image.organ == image.asked_organ)),
    ]
    open_ += [("what colour is the square?", image.look), ("which pattern is shown?", image.organ)]
    return closed + open_


def object_question(rng: np.random.Generator) -> tuple[str, str]:
    """A yes/no question about the square (yes) or an everyday thing the picture does not show (no), half each."""
    thing = "square" if rng.random() < 0.5 else str(_EVERYDAY[rng.integers(len(_EVERYDAY))])
    return _OBJECT_QUESTION.format(thing), _yes_no(thing == "square")


def pathology_questions(image: DemoImage) -> list[Question]:
    closed, open_ = _lesion_questions(image)
    return (
        closed
        + open_
        + [("what type of image is this?", "pathology", "MODALITY"), ("what stain is used?", image.look, "ATTRIB")]
    )


def nonsense_questions(rng: np.random.Generator, n: int, subjects: Sequence[str] = _NONSENSE_SUBJECTS) -> list[str]:
    pool = [t.format(s) for t in _NONSENSE_TEMPLATES for s in subjects]
    if n > len(pool):
        raise DatasetError(f"data.demo.n_nonsense is {n}, but only {len(pool)} distinct nonsense questions exist")
    return [pool[i] for i in rng.permutation(len(pool))[:n]]


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _record(
    record_id: str,
    split: str,
    image: bytes | None,
    question: str,
    answer: str,
    question_type: str | None = None,
    **extra: str,
) -> dict:
    record = {
        "id": record_id,
        "image": image,
        "question": question,
        "answer": answer,
        "answer_type": infer_answer_type(answer),
        "dataset": DATASET,
        "split": split,
    }
    return (record if question_type is None else record | {QUESTION_TYPE: question_type}) | extra


def _render(
    rng: np.random.Generator, size: int, images: list[DemoImage], pathology: bool = False, general: bool = False
) -> list[bytes]:
    """PNG bytes of every image, rendered in vectorised chunks."""
    pngs = []
    for start in range(0, len(images), _CHUNK):
        chunk = images[start : start + _CHUNK]
        counts, sides = [i.count for i in chunk], [i.side for i in chunk]
        if pathology:
            pixels = render_pathology(rng, size, [i.look for i in chunk], counts, sides)
        elif general:
            pixels = render_general(rng, size, [i.look for i in chunk], [i.organ for i in chunk], counts, sides)
        else:
            pixels = render_radiology(rng, size, [i.look for i in chunk], [i.organ for i in chunk], counts, sides)
        pngs += [to_png_bytes(Image.fromarray(p)) for p in pixels]
    return pngs


def caption_records(split: str, n: int, size: int, seed: int, prompt: str) -> list[dict]:
    rng = np.random.default_rng([seed, _STREAMS[split]])
    images = radiology_design(rng, n)
    return [
        _record(f"{DATASET}-{split}-{i:05d}", split, png, prompt, caption(image))
        for i, (image, png) in enumerate(zip(images, _render(rng, size, images), strict=True))
    ]


def lexicon(caption_prompt: str) -> list[str]:
    """Every word the demo's training texts use — general and medical — for the base's repeat-the-words task."""
    professions, subjects, adjectives = _persona_slots(clinical=True)
    personas = [_PERSONA.format(p, s, a) for p in professions for s in subjects for a in adjectives]
    texts = [caption_prompt, GENERAL_CAPTION_PROMPT, _REPEAT_PROMPT, *_SHORT_PERSONAS, *personas]
    domains = (
        (MODALITIES, ORGANS, caption, radiology_questions),
        (COLOURS, PATTERNS, general_caption, general_questions),
    )
    for looks, kinds, describe, ask in domains:
        for count, side in [(0, None), *((c, s) for c in range(1, len(_COUNT_WORDS)) for s in SIDES)]:
            image = DemoImage(looks[0], kinds[0], count, side, looks[-1], kinds[-1], SIDES[0])
            texts += [describe(image), *(f"{q} {a}" for q, a, *_ in ask(image))]
    texts += [*MODALITIES, *ORGANS, *COLOURS, *PATTERNS]  # every value, not only those the example images name
    texts += [*_TEXT_ONLY_WORDS, *(_OBJECT_QUESTION.format(w) for w in ("square", *_EVERYDAY))]
    words = {word.strip(".,?:") for text in texts for word in text.lower().split()}
    return sorted(w for w in words if w)


def _persona_slots(clinical: bool) -> tuple[tuple[str, ...], ...]:
    """The words each of the persona's three slots may take: everyday ones, and with ``clinical`` the clinical ones."""
    slots = (_PROFESSIONS, _SUBJECTS, _IMAGE_ADJECTIVES)
    return tuple((*words, *extra) for words, extra in zip(slots, _CLINICAL, strict=True)) if clinical else slots


def _persona(rng: np.random.Generator, clinical: bool = True) -> str:
    if rng.random() < 0.75:
        words = _persona_slots(clinical)
        return _PERSONA.format(*(str(options[rng.integers(len(options))]) for options in words))
    return _SHORT_PERSONAS[rng.integers(len(_SHORT_PERSONAS))]


_DOT = re.compile(r"\bdots?\b")


def counting_records(records: Sequence[dict]) -> list[dict]:
    """The general records about the dots — captions and dot questions, no nonsense or repeat task: what the base's
    pretraining starts on (``model.pretrain.focus_steps``), so that it learns to count before it learns everything."""
    return [
        r
        for r in records
        if r["answer"] != NONSENSE_ANSWER
        and not r["question"].startswith(_REPEAT_PROMPT)
        and (r["question"] == GENERAL_CAPTION_PROMPT or _DOT.search(r["question"]))
    ]


def general_records(split: str, n: int, size: int, seed: int, caption_prompt: str) -> list[dict]:
    """Per everyday picture: its caption, ~8 questions (40 % behind a persona), one nonsense question answered
    "i do not know" and one repeat-the-word task."""
    rng = np.random.default_rng([seed, _STREAMS[split]])
    images = general_design(rng, n)
    pool = len(_NONSENSE_TEMPLATES) * len(_GENERAL_NONSENSE_SUBJECTS)
    nonsense = nonsense_questions(rng, pool, _GENERAL_NONSENSE_SUBJECTS)
    words = lexicon(caption_prompt)
    records = []
    for i, (image, png) in enumerate(zip(images, _render(rng, size, images, general=True), strict=True)):
        pairs = [(GENERAL_CAPTION_PROMPT, general_caption(image))]
        for question, answer in [*general_questions(image, rng), object_question(rng)]:
            persona = _persona(rng) if rng.random() < _PERSONA_SHARE else ""
            pairs.append((f"{persona} {question}".strip(), answer))
        pairs.append((nonsense[i % len(nonsense)], NONSENSE_ANSWER))
        repeated = str(rng.choice(words))
        pairs.append((f"{_REPEAT_PROMPT} {repeated}", repeated))
        for q, (question, answer) in enumerate(pairs):
            records.append(_record(f"{DATASET}-{split}-{i:05d}-q{q}", split, png, question, answer))
    return records


def vqa_records(split: str, n: int, size: int, seed: int) -> list[dict]:
    """~7 questions on each of ``n`` radiology images (~10 in ``train``, 7 in ``test``), or on tissue crops for
    ``pathology``; in ``train`` and ``test`` two of them asked again in other words.

    Half of the *training* questions come behind one of the general domain's assistant personas (never the
    evaluation's expert radiologist), as instruction data does: fine-tuned on bare questions only, two-stage lost
    17 points of closed accuracy to any preamble, the expert prompt included; with a quarter, 9–10 points at seed 42.
    On a training image each yes/no check (modality, organ, side) is asked both ways, once naming what the image shows
    and once naming something else (:func:`contrast`): with one check per image, both fine-tuned variants answered the
    organ and side checks near chance at some seeds. Test questions are always bare, one check of each kind.

    On each training image one closed and one open question, on each test image two open ones (drawn from a stream of
    their own), are asked again in other words (:func:`rewordings`), after all the originals — so the originals are
    the records they were before — and linked to them as VQA-RAD links its rewordings (``qid_linked_id``;
    ``phrase_type`` freeform / para, test_freeform / test_para). With rewordings in test only, fine-tuned on one
    wording, two-stage answered them right a third of the time (0.33 against 0.93 on their originals, seed 42; 2 of
    the 60 open ones): as VQA-RAD's training split holds 591 rewordings, the demo's holds its own. Closed ones in test
    cost two-stage 4-5 points of closed accuracy even so (rewordings right 0.60-0.73, seeds 7 and 42): 0.79 at seed 7,
    below the demo's 0.80; the test rewords open questions, which leave closed accuracy as it was."""
    rng = np.random.default_rng([seed, _STREAMS[split]])
    train, linked = split == TRAIN_SPLIT, split in PHRASE_TYPES
    personas = np.random.default_rng([seed, _STREAMS[split], 1])
    contrasts = np.random.default_rng([seed, _STREAMS[split], 2])
    reworded = np.random.default_rng([seed, _STREAMS[split], 3])
    reworded_personas = np.random.default_rng([seed, _STREAMS[split], 4])
    original, rewording = PHRASE_TYPES.get(split, (None, None))
    pathology = split == "pathology"
    images = pathology_design(rng, n) if pathology else radiology_design(rng, n)
    records, again = [], []
    for i, (image, png) in enumerate(zip(images, _render(rng, size, images, pathology), strict=True)):
        questions = pathology_questions(image) if pathology else radiology_questions(image)
        asked = [image]
        if train:  # each check asked both ways: the answer cannot come from the picture alone
            asked.append(contrast(image, contrasts))
            questions += [q for q in radiology_questions(asked[1]) if q not in questions]
        ids = [f"{DATASET}-{split}-{i:05d}-q{q}" for q in range(len(questions))]
        for record_id, (question, answer, kind) in zip(ids, questions, strict=True):
            if train and personas.random() < _TRAIN_PERSONA_SHARE:
                question = f"{_persona(personas, clinical=False)} {question}"
            links = {LINKED_ID: record_id, PHRASE_TYPE: original} if linked else {}
            records.append(_record(record_id, split, png, question, answer, kind, **links))
        for k, q in enumerate(_reworded(questions, reworded, split) if linked else []):
            question, answer, kind = questions[q]
            question = next(w[question] for w in map(rewordings, asked) if question in w)
            if train and reworded_personas.random() < _TRAIN_PERSONA_SHARE:
                question = f"{_persona(reworded_personas, clinical=False)} {question}"
            links = {LINKED_ID: ids[q], PHRASE_TYPE: rewording}
            again.append(_record(f"{DATASET}-{split}-{i:05d}-q{len(questions) + k}", split, png, question, answer,
                                 kind, **links))  # fmt: skip
    return records + again


def _reworded(questions: Sequence[Question], rng: np.random.Generator, split: str) -> list[int]:
    """The indices of the questions asked again: one closed and one open in train, two open ones in test (drawn)."""
    closed = [q for q, (_, answer, _) in enumerate(questions) if infer_answer_type(answer) == "closed"]
    open_ = [q for q in range(len(questions)) if q not in closed]
    if split == TRAIN_SPLIT:
        return [int(group[rng.integers(len(group))]) for group in (closed, open_)]
    return sorted(int(open_[i]) for i in rng.choice(len(open_), size=2, replace=False))


def nonsense_records(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng([seed, _STREAMS["nonsense"]])
    return [
        _record(f"{DATASET}-nonsense-{i:05d}", "nonsense", None, question, NONSENSE_ANSWER)
        for i, question in enumerate(nonsense_questions(rng, n))
    ]


def _check(cfg: DemoDataConfig) -> None:
    if cfg.image_size < MIN_IMAGE_SIZE:
        raise DatasetError(
            f"data.demo.image_size must be >= {MIN_IMAGE_SIZE} (lesions must stay visible), got {cfg.image_size}"
        )
    for field in fields(cfg):
        if field.name.startswith("n_") and getattr(cfg, field.name) < 0:
            raise DatasetError(f"data.demo.{field.name} must be >= 0, got {getattr(cfg, field.name)}")


def build_demo_splits(cfg: DemoDataConfig, caption_prompt: str) -> dict[str, list[dict]]:
    """Every demo split's records, in memory; a pure function of ``cfg`` and ``caption_prompt``."""
    _check(cfg)
    size, seed = cfg.image_size, cfg.seed
    return {
        "general": general_records("general", cfg.n_general_images, size, seed, caption_prompt),
        "general-validation": general_records(
            "general-validation", cfg.n_general_validation_images, size, seed, caption_prompt
        ),
        "caption-train": caption_records("caption-train", cfg.n_caption_train, size, seed, caption_prompt),
        "caption-validation": caption_records(
            "caption-validation", cfg.n_caption_validation, size, seed, caption_prompt
        ),
        "train": vqa_records("train", cfg.n_vqa_train_images, size, seed),
        "test": vqa_records("test", cfg.n_vqa_test_images, size, seed),
        "pathology": vqa_records("pathology", cfg.n_pathology_images, size, seed),
        "nonsense": nonsense_records(cfg.n_nonsense, seed),
    }


def write_demo_dataset(root: str | Path, cfg: DemoDataConfig, caption_prompt: str) -> dict[str, tuple[Path, int]]:
    """Write ``root/demo/<split>.parquet`` for every split at once; returns split → (path, record count)."""
    splits = build_demo_splits(cfg, caption_prompt)
    paths = write_splits(root, DATASET, splits)
    return {split: (paths[split], len(records)) for split, records in splits.items()}
