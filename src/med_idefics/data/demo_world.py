"""The demo world (:mod:`med_idefics.data.demo`): what each image shows and what its yes/no checks ask (balanced, so
that priors gain nothing), and the words about it — captions, questions in VQA-RAD's question types and each one's
rewording, assistant personas, Med-HALT-style nonsense questions, and the vocabulary of them all."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

from med_idefics.data.demo_images import COLOURS, MODALITIES, ORGANS, PATTERNS, SIDES, STAINS
from med_idefics.data.schema import DatasetError

GENERAL_CAPTION_PROMPT = "describe this image."
_COUNT_WORDS = ("zero", "one", "two", "three")
_ARTICLE = {"ct": "a", "mri": "an", "x-ray": "an"}
NONSENSE_TEMPLATES = (
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
GENERAL_NONSENSE_SUBJECTS = ("square", "dot", "pattern", "stripe", "shape", "picture", "photograph", "colour")
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
REPEAT_PROMPT = "repeat these words:"
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
    pool = [t.format(s) for t in NONSENSE_TEMPLATES for s in subjects]
    if n > len(pool):
        raise DatasetError(f"data.demo.n_nonsense is {n}, but only {len(pool)} distinct nonsense questions exist")
    return [pool[i] for i in rng.permutation(len(pool))[:n]]


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def lexicon(caption_prompt: str) -> list[str]:
    """Every word the demo's training texts use — general and medical — for the base's repeat-the-words task."""
    professions, subjects, adjectives = _persona_slots(clinical=True)
    personas = [_PERSONA.format(p, s, a) for p in professions for s in subjects for a in adjectives]
    texts = [caption_prompt, GENERAL_CAPTION_PROMPT, REPEAT_PROMPT, *_SHORT_PERSONAS, *personas]
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


def persona(rng: np.random.Generator, clinical: bool = True) -> str:
    if rng.random() < 0.75:
        words = _persona_slots(clinical)
        return _PERSONA.format(*(str(options[rng.integers(len(options))]) for options in words))
    return _SHORT_PERSONAS[rng.integers(len(_SHORT_PERSONAS))]
