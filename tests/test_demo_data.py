"""The offline demo dataset: deterministic, schema-conform, balanced, and answerable only by looking at the image."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage
from sklearn.linear_model import LogisticRegression

from med_idefics.config import DemoDataConfig
from med_idefics.data.demo import NONSENSE_ANSWER, build_demo_splits, write_demo_dataset
from med_idefics.data.images import image_from_bytes
from med_idefics.data.schema import COLUMNS, DatasetError, infer_answer_type, read_records

PROMPT = "Describe this radiology image."
SMALL = DemoDataConfig(
    seed=7,
    image_size=64,
    n_general_images=8,
    n_general_validation_images=2,
    n_caption_train=12,
    n_caption_validation=4,
    n_vqa_train_images=10,
    n_vqa_test_images=6,
    n_pathology_images=6,
    n_nonsense=5,
)
# Big enough for per-template statistics; still well under a second to build.
MEDIUM = DemoDataConfig(
    seed=11,
    image_size=64,
    n_general_images=120,
    n_general_validation_images=4,
    n_caption_train=80,
    n_caption_validation=10,
    n_vqa_train_images=240,
    n_vqa_test_images=90,
    n_pathology_images=120,
    n_nonsense=30,
)
LESION_LEVEL = 240  # lesion cores are pure white; nothing else in a radiology image gets above ~215


@pytest.fixture(scope="module")
def medium() -> dict[str, list[dict]]:
    return build_demo_splits(MEDIUM, PROMPT)


def _by_image(records: list[dict]) -> dict[str, dict[str, str]]:
    """image id → {question: answer}, from ``demo-<split>-00042-q3`` ids."""
    grouped: dict[str, dict[str, str]] = defaultdict(dict)
    for record in records:
        grouped[record["id"].rsplit("-q", 1)[0]][_bare(record["question"])] = record["answer"]
    return grouped


def _bare(question: str) -> str:
    """The question without a persona before it (half of the training questions have one)."""
    return question.rsplit(". ", 1)[-1]


def _grey(record: dict) -> np.ndarray:
    return np.asarray(image_from_bytes(record["image"]))[..., 0].astype(np.float64)


def test_generation_is_byte_identical_and_seeded(tmp_path):
    first = write_demo_dataset(tmp_path / "a", SMALL, PROMPT)
    second = write_demo_dataset(tmp_path / "b", SMALL, PROMPT)
    other = write_demo_dataset(tmp_path / "c", replace(SMALL, seed=8), PROMPT)
    assert set(first) == {
        *("general", "general-validation", "caption-train", "caption-validation"),
        *("train", "test", "pathology", "nonsense"),
    }
    for split, (path, _) in first.items():
        assert path.read_bytes() == second[split][0].read_bytes(), split
    assert first["train"][0].read_bytes() != other["train"][0].read_bytes()


def test_written_splits_follow_the_schema_and_the_config(tmp_path):
    written = write_demo_dataset(tmp_path, SMALL, PROMPT)
    images_per_split = {
        "general": SMALL.n_general_images,
        "general-validation": SMALL.n_general_validation_images,
        "caption-train": SMALL.n_caption_train,
        "caption-validation": SMALL.n_caption_validation,
        "train": SMALL.n_vqa_train_images,
        "test": SMALL.n_vqa_test_images,
        "pathology": SMALL.n_pathology_images,
    }
    all_ids = []
    for split, (path, count) in written.items():
        assert path == tmp_path / "demo" / f"{split}.parquet"
        records = read_records(tmp_path, "demo", split)
        assert len(records) == count
        all_ids += [r["id"] for r in records]
        for record in records:
            assert tuple(record) == COLUMNS
            assert record["dataset"] == "demo" and record["split"] == split
            assert record["answer_type"] == infer_answer_type(record["answer"])
            assert record["answer"] == record["answer"].lower()
            if not split.startswith(("caption", "general")):  # personas included: all lower case
                assert record["question"] == record["question"].lower()
            if record["image"] is not None:
                image = image_from_bytes(record["image"])
                assert image.mode == "RGB" and image.size == (SMALL.image_size, SMALL.image_size)
        if split in images_per_split:
            assert len(_by_image(records)) == images_per_split[split]
    assert len(all_ids) == len(set(all_ids))
    assert "demo-train-00003-q2" in all_ids and "demo-caption-train-00011" in all_ids


CAPTION = re.compile(
    r"(?P<modality>ct|mri|x-ray) of the (?P<organ>brain|chest|abdomen) with "
    r"(zero lesions|(?P<count>one|two|three) lesions? on the (?P<side>left|right) side)\."
)
COUNT_WORDS = ["zero", "one", "two", "three"]


def test_captions_describe_what_the_image_shows(medium):
    seen = Counter()
    for record in medium["caption-train"]:
        assert record["question"] == PROMPT and record["answer_type"] == "open"
        match = CAPTION.fullmatch(record["answer"])
        assert match, record["answer"]
        bright = _grey(record) >= LESION_LEVEL
        assert ndimage.label(bright)[1] == COUNT_WORDS.index(match["count"] or "zero"), record["id"]
        seen.update([match["modality"], match["organ"]])
    assert all(seen[word] >= 10 for word in ("ct", "mri", "x-ray", "brain", "chest", "abdomen")), seen


def _originals(records: list[dict]) -> list[dict]:
    """The records that are not a rewording of another (phrase_type para in train, test_para in test)."""
    return [r for r in records if r.get("phrase_type") not in ("para", "test_para")]


def test_vqa_has_about_seven_questions_per_test_image_and_asks_each_training_check_both_ways(medium):
    per_image = [len(qa) for qa in _by_image(_originals(medium["test"])).values()]
    assert min(per_image) >= 5 and 6.5 <= np.mean(per_image) <= 8.5
    checks = re.compile(r"(is this an? \S+ image|does this image show the \S+|is the lesion on the \S+)\?$")
    for qa in _by_image(medium["train"]).values():
        forms = defaultdict(set)
        for question, answer in qa.items():
            if checks.search(question):
                form = re.sub(r"(an? \S+ image|the \S+)\?$", "X?", _bare(question))
                forms[form].add(answer)
        assert len(forms) >= 2 and all(answers == {"yes", "no"} for answers in forms.values()), forms


def test_nonsense_is_text_only_and_answered_by_abstaining(medium):
    records = medium["nonsense"]
    assert len(records) == MEDIUM.n_nonsense
    assert all(r["image"] is None and r["answer"] == NONSENSE_ANSWER and r["answer_type"] == "open" for r in records)
    assert len({r["question"] for r in records}) == len(records)


@pytest.mark.parametrize("split", ["train", "test", "pathology"])
def test_closed_answers_are_balanced_per_template(medium, split):
    answers = defaultdict(list)
    for record in _originals(medium[split]):  # the rewordings: test_each_test_image_asks_two_questions_again
        if record["answer_type"] == "closed":
            answers[_bare(record["question"])].append(record["answer"] == "yes")
    assert len(answers) == (4 if split == "pathology" else 10)  # lesion, 2 sides, multiplicity (+3 modality, 3 organ)
    for question, yes in answers.items():
        assert 0.4 <= np.mean(yes) <= 0.6, (question, np.mean(yes), len(yes))


@pytest.mark.parametrize("split", ["train", "test"])
def test_no_template_can_be_answered_from_the_question_alone(medium, split):
    answers = defaultdict(Counter)
    for record in _originals(medium[split]):
        answers[_bare(record["question"])][record["answer"]] += 1
    for question, counts in answers.items():
        assert counts.most_common(1)[0][1] / counts.total() <= 0.6, (question, counts)


def test_lesion_pixels_match_count_and_side(medium):
    """Lesions are bright discs: their number and half of the image are what the answers say."""
    records = {r["id"]: r for r in medium["train"]}
    sides_seen = Counter()
    for image_id, qa in _by_image(medium["train"]).items():
        pixels = _grey(records[f"{image_id}-q0"])
        bright = pixels >= LESION_LEVEL
        count = COUNT_WORDS.index(qa["how many lesions are there?"])
        assert ndimage.label(bright)[1] == count, image_id
        assert qa["is there a lesion?"] == ("yes" if count else "no")
        if count:
            side = qa["which side is the lesion on?"]
            columns = np.nonzero(bright)[1]
            half = pixels.shape[1] / 2
            assert (columns < half).all() if side == "left" else (columns >= half).all(), image_id
            sides_seen[side] += 1
    assert sides_seen["left"] > 20 and sides_seen["right"] > 20


@pytest.mark.parametrize(("question", "floor"), [("what modality is this?", 0.9), ("which organ is shown?", 0.9)])
def test_pixels_predict_modality_and_organ(medium, question, floor):
    """A linear model on 8x8-pooled pixels learns the attribute on train and gets test right (a blind guess: 1/3)."""

    def features_and_labels(split):
        records = {r["id"]: r for r in medium[split]}
        grouped = _by_image(medium[split])
        pooled = [_grey(records[f"{i}-q0"]).reshape(8, 8, 8, 8).mean(axis=(1, 3)).ravel() / 255 for i in grouped]
        return np.array(pooled), [qa[question] for qa in grouped.values()]

    model = LogisticRegression(max_iter=2000).fit(*features_and_labels("train"))
    assert model.score(*features_and_labels("test")) >= floor


def test_pathology_is_a_different_looking_domain(medium):
    grouped = _by_image(medium["pathology"])
    stains = Counter(qa["what stain is used?"] for qa in grouped.values())
    assert stains == Counter({"immunohistochemistry": 60, "h&e": 60})
    image = np.asarray(image_from_bytes(medium["pathology"][0]["image"])).astype(float)
    assert np.abs(image[..., 0] - image[..., 2]).mean() > 10  # coloured tissue, unlike the grey radiology images


def test_invalid_config_is_refused_naming_the_key(tmp_path):
    with pytest.raises(DatasetError, match=r"data\.demo\.image_size"):
        write_demo_dataset(tmp_path, replace(SMALL, image_size=16), PROMPT)
    with pytest.raises(DatasetError, match=r"data\.demo\.n_nonsense"):
        write_demo_dataset(tmp_path, replace(SMALL, n_nonsense=10_000), PROMPT)
    assert not (tmp_path / "demo").exists()


MEDICAL_WORDS = re.compile(r"\b(ct|mri|x-ray|brain|chest|abdomen|lesions?|radiology)\b")


def test_the_general_domain_has_no_medical_image_caption_or_question(medium):
    """The base's pretraining split: everyday pictures (coloured, unlike every radiology image), captions and
    questions without a medical word; medical words occur only as text to repeat, as a language model knows them."""
    records = medium["general"]
    kinds = Counter()
    for record in records:
        if record["question"].startswith("repeat these words:"):
            assert record["question"].endswith(record["answer"])
            kinds["repeat"] += 1
            continue
        assert not MEDICAL_WORDS.search(record["question"] + " " + record["answer"]), record
        kinds["nonsense" if record["answer"] == NONSENSE_ANSWER else record["answer_type"]] += 1
    assert kinds["repeat"] == kinds["nonsense"] == MEDIUM.n_general_images
    assert kinds["closed"] > 3 * MEDIUM.n_general_images and kinds["open"] > 3 * MEDIUM.n_general_images
    repeated = " ".join(r["answer"] for r in records if r["question"].startswith("repeat"))
    assert MEDICAL_WORDS.search(repeated)
    image = np.asarray(image_from_bytes(records[0]["image"])).astype(float)
    assert np.ptp(image, axis=-1).max() > 60  # a coloured square


def test_general_closed_answers_are_balanced_per_template(medium):
    answers = defaultdict(list)
    for record in medium["general"]:
        if record["answer_type"] == "closed" and not record["question"].startswith("repeat these words:"):
            question = record["question"].rsplit(". ", 1)[-1]  # without a persona
            answers[question].append(record["answer"] == "yes")
    things = {q: answers.pop(q) for q in list(answers) if re.fullmatch(r"is there a (?!dot\?)\w+\?", q)}
    square = things.pop("is there a square?")
    assert square and all(square)  # always yes
    assert len(things) == 8 and not any(yes for answers_ in things.values() for yes in answers_)  # a cat: never
    assert len(answers) == 16, sorted(answers)  # dot, 2 sides, multiplicity; 3 colours, 3 patterns, 2 wordings each
    templates = defaultdict(list)  # the wording is drawn; the yes/no balance is per check
    for question, yes in answers.items():
        templates[question.replace(" image?", " square?").replace("show the ", "show a ")] += yes
    assert len(templates) == 10
    for question, yes in templates.items():
        assert 0.35 <= np.mean(yes) <= 0.65, (question, np.mean(yes), len(yes))


def test_half_of_the_training_questions_have_a_general_persona_and_no_test_question_has_one(medium):
    train = [r["question"] for r in medium["train"]]
    with_persona = [q for q in train if q != _bare(q)]
    assert 0.4 <= len(with_persona) / len(train) <= 0.6
    assert not [q for q in with_persona if "radiologist" in q or "medical" in q]  # never the expert persona
    assert all(q == _bare(q) for q in (r["question"] for r in medium["test"]))


QUESTION_TYPES = {  # the template's words → its question_type (VQA-RAD's codes)
    "is there a lesion?": "PRES",
    "is the lesion on the": "POS",
    "which side is the lesion on?": "POS",
    "is there more than one lesion?": "COUNT",
    "how many lesions are there?": "COUNT",
    "is this a": "MODALITY",
    "is this an": "MODALITY",
    "what modality is this?": "MODALITY",
    "what type of image is this?": "MODALITY",
    "does this image show the": "ORGAN",
    "which organ is shown?": "ORGAN",
    "what stain is used?": "ATTRIB",
    # the test split's rewordings (demo.rewordings)
    "does this image show a lesion?": "PRES",
    "on which side is the lesion?": "POS",
    "does this image show more than one lesion?": "COUNT",
    "how many lesions does this image show?": "COUNT",
    "is the modality": "MODALITY",
    "which modality is shown?": "MODALITY",
    "is the brain shown?": "ORGAN",
    "is the chest shown?": "ORGAN",
    "is the abdomen shown?": "ORGAN",
    "what organ does this image show?": "ORGAN",
}


@pytest.mark.parametrize("split", ["train", "test", "pathology"])
def test_every_vqa_question_carries_its_templates_type(medium, split, tmp_path):
    """The optional question_type column (the report's accuracy by type): every VQA question has its template's type,
    it survives the parquet round trip (schema.question_types), and the general domain has none."""
    from med_idefics.data.schema import question_types

    for record in medium[split]:
        question = _bare(record["question"])
        (kind,) = {kind for start, kind in QUESTION_TYPES.items() if question.startswith(start)}
        assert record["question_type"] == kind, question
    assert all("question_type" not in record for record in medium["general"])
    write_demo_dataset(tmp_path, SMALL, PROMPT)
    stored = question_types(tmp_path, "demo")
    test = build_demo_splits(SMALL, PROMPT)["test"]
    assert {record["id"]: record["question_type"] for record in test}.items() <= stored.items()
    assert not any(key.startswith("demo-general") for key in stored)


@pytest.mark.parametrize(
    ("split", "phrases", "kinds"),
    [("train", ("freeform", "para"), {"closed": 1, "open": 1}), ("test", ("test_freeform", "test_para"), {"open": 2})],
)
def test_each_image_asks_two_questions_again_in_other_words(medium, split, phrases, kinds, tmp_path):
    """The rewordings (consistency under rewording; VQA-RAD's train holds 591, its test 143): per training image one
    closed and one open question asked again, per test image two open ones (closed accuracy stays that of the
    originals), after all the originals, in words the base knows, linked as VQA-RAD links them (qid_linked_id,
    phrase_type); each with its original's answer, type and image."""
    from med_idefics.data.demo_world import lexicon, rewordings
    from med_idefics.data.rewordings import links, rewording_pairs

    records = medium[split]
    by_id = {r["id"]: r for r in records}
    originals = _originals(records)
    again = [r for r in records if r["phrase_type"] == phrases[1]]
    assert records == originals + again  # the originals first: the records they were before rewordings existed
    assert all(r["phrase_type"] == phrases[0] and r["qid_linked_id"] == r["id"] for r in originals)
    n_images = MEDIUM.n_vqa_train_images if split == "train" else MEDIUM.n_vqa_test_images
    assert len(again) == 2 * n_images
    words = set(lexicon(PROMPT))
    wordings = {rewording for templates in map(rewordings, _all_designs()) for rewording in templates.values()}
    for r in again:
        original = by_id[r["qid_linked_id"]]
        assert original["phrase_type"] == phrases[0] and _bare(original["question"]) != _bare(r["question"])
        assert _bare(r["question"]) in wordings
        assert {k: original[k] for k in ("image", "answer", "answer_type", "question_type")} == {
            k: r[k] for k in ("image", "answer", "answer_type", "question_type")
        }
        assert set(r["question"].rstrip("?").replace(",", "").replace(".", "").split()) <= words, r["question"]
    per_image = defaultdict(Counter)
    for r in again:
        per_image[r["id"].rsplit("-q", 1)[0]][r["answer_type"]] += 1
    assert len(per_image) == n_images and all(kinds == counts for counts in per_image.values())
    assert len({r["qid_linked_id"] for r in again}) == len(again)  # never the same question twice
    closed = [r["answer"] == "yes" for r in again if r["answer_type"] == "closed"]
    assert not closed or 0.35 <= np.mean(closed) <= 0.65  # drawn, not balanced by design: near half
    write_demo_dataset(tmp_path, SMALL, PROMPT)
    small = build_demo_splits(SMALL, PROMPT)[split]
    pairs = rewording_pairs([r["id"] for r in small], links(tmp_path, "demo"))  # read back from the parquet
    assert pairs == [(r["qid_linked_id"], r["id"]) for r in small if r["phrase_type"] == phrases[1]]


def _all_designs():
    """One image per modality x organ x side asked about (every wording :func:`rewordings` can give)."""
    from med_idefics.data.demo_images import MODALITIES, ORGANS, SIDES
    from med_idefics.data.demo_world import DemoImage

    return [DemoImage(m, o, 1, s, m, o, s) for m in MODALITIES for o in ORGANS for s in SIDES]
