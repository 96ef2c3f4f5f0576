"""The evaluation suites (which question meets which image, with which prefix) and the Med-HALT abstention rule."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from med_idefics.cli.evaluate import KNOWN_SUITE_NAMES, SUITE_NAMES
from med_idefics.config import ConfigError, load_params
from med_idefics.data.collator import render_prompt
from med_idefics.data.images import to_png_bytes
from med_idefics.data.schema import DatasetError, write_splits
from med_idefics.data.suites import (
    KNOWN_SUITES,
    SUITES,
    derangement,
    distinct_images,
    expert_prefix,
    load_suite,
    parse_suites,
    swap_images,
)
from med_idefics.scoring.metrics import is_abstention, summarize_abstention

EXPERT = "You are an expert radiologist."


def _png(value: int) -> bytes:
    return to_png_bytes(Image.new("RGB", (8, 8), (value, 255 - value, value // 2)))


def _record(record_id: str, image: bytes | None, question: str = "is there a lesion?", answer: str = "yes") -> dict:
    answer_type = "closed" if answer in ("yes", "no") else "open"
    return {"id": record_id, "image": image, "question": question, "answer": answer, "answer_type": answer_type,
            "dataset": "toy", "split": "test"}  # fmt: skip


def _records_sharing_images(n_images: int, per_image: int = 3) -> list[dict]:
    """``per_image`` questions on each image; images 0 and 1 have identical bytes under different image ids."""
    images = [_png(0 if i == 1 else i) for i in range(n_images)]
    return [_record(f"img{i}-q{q}", png, f"question {q} on image {i}?") for i, png in enumerate(images)
            for q in range(per_image)]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- swap


@pytest.mark.parametrize("n", [2, 3, 5, 30])
def test_derangement_is_a_permutation_without_fixed_points(n):
    for seed in range(20):
        permutation = derangement(n, np.random.default_rng(seed))
        assert sorted(permutation.tolist()) == list(range(n))
        assert not np.any(permutation == np.arange(n))


def test_derangement_is_reproducible_and_depends_on_the_seed():
    first = derangement(20, np.random.default_rng([0, 0]))
    assert np.array_equal(first, derangement(20, np.random.default_rng([0, 0])))
    assert not np.array_equal(first, derangement(20, np.random.default_rng([1, 0])))
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, np.random.default_rng(0))


def test_swap_never_keeps_identical_image_bytes():
    records = _records_sharing_images(12)
    for seed in range(25):
        swapped = swap_images(records, np.random.default_rng(seed))
        assert [r["id"] for r in swapped] == [r["id"] for r in records]
        assert [r["question"] for r in swapped] == [r["question"] for r in records]
        for before, after in zip(records, swapped, strict=True):
            assert after["image"] != before["image"]  # also for the two image ids sharing the same bytes
        # questions about one image move together to one other image of the split
        moved = {}
        for before, after in zip(records, swapped, strict=True):
            assert moved.setdefault(before["image"], after["image"]) == after["image"]
        assert set(moved.values()) == set(distinct_images(records))


def test_swap_is_seeded():
    records = _records_sharing_images(12)
    images = [r["image"] for r in swap_images(records, np.random.default_rng([0, 0]))]
    assert images == [r["image"] for r in swap_images(records, np.random.default_rng([0, 0]))]
    assert images != [r["image"] for r in swap_images(records, np.random.default_rng([3, 0]))]


def test_swap_needs_two_distinct_images():
    same = [_record(f"q{i}", _png(7)) for i in range(4)]
    with pytest.raises(DatasetError, match="1 distinct image"):
        swap_images(same, np.random.default_rng(0))
    with pytest.raises(DatasetError, match="no image"):
        swap_images([*same, _record("bare", None)], np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------------------- suites


@pytest.fixture
def params(tmp_path, repo_root):
    """A toy dataset in the schema: 5 images x 3 questions (test), 2 pathology, 4 nonsense questions (no image)."""
    test = _records_sharing_images(5)
    pathology = [_record(f"path{i}", _png(100 + i), "is this tissue stained?") for i in range(2)]
    nonsense = [_record(f"nonsense{i}", None, f"what is the liver's favourite song {i}?", "i do not know")
                for i in range(4)]  # fmt: skip
    write_splits(tmp_path / "data", "toy", {"test": test, "pathology": pathology, "nonsense": nonsense})
    overrides = {"data.root": str(tmp_path / "data"), "data.prompt_prefix": "Answer briefly.", "eval.seed": 0,
                 "eval.expert_prompt": EXPERT, "data.vqa.dataset": "toy", "data.vqa.eval_split": "test",
                 "data.ood.dataset": "toy", "data.ood.split": "pathology", "data.nonsense.dataset": "toy",
                 "data.nonsense.split": "nonsense"}  # fmt: skip
    return load_params(repo_root / "params.yaml", overrides)


def test_each_suite_reads_its_whole_split(params):
    sizes = {name: len(load_suite(params, name).records) for name in SUITES}
    assert sizes == {"vqa-rad": 15, "path-vqa": 2, "swap": 15, "blank": 15, "expert-prompt": 15, "med-halt": 4}
    assert load_suite(params, "vqa-rad").prefix == "Answer briefly."
    assert {r["id"] for r in load_suite(params, "path-vqa").records} == {"path0", "path1"}


def test_blank_asks_the_same_questions_with_a_black_image_of_each_images_size(params, tmp_path):
    """The blank suite: vqa-rad's questions, prefix and order; each image a black RGB image of its own size."""
    wide = to_png_bytes(Image.new("RGB", (24, 10), (200, 30, 90)))
    write_splits(tmp_path / "data", "toy", {"test": [*_records_sharing_images(3), _record("wide", wide)]})
    sighted, blank = load_suite(params, "vqa-rad"), load_suite(params, "blank")
    assert (blank.blanks, sighted.blanks, blank.prefix) == ("vqa-rad", None, sighted.prefix)
    for before, after in zip(sighted.records, blank.records, strict=True):
        assert {k: v for k, v in after.items() if k != "image"} == {k: v for k, v in before.items() if k != "image"}
        with Image.open(io.BytesIO(before["image"])) as shown, Image.open(io.BytesIO(after["image"])) as black:
            assert black.size == shown.size and black.mode == "RGB"
            assert np.asarray(black).max() == 0 and np.asarray(shown).max() > 0


def test_validation_blank_blanks_the_validation_split(repo_root, tmp_path):
    train = _records_sharing_images(10, per_image=2)
    write_splits(tmp_path / "data", "toy", {"train": train, "test": _records_sharing_images(2)})
    overrides = {"data.root": str(tmp_path / "data"), "data.vqa.dataset": "toy", "data.vqa.validation_fraction": 0.2}
    params = load_params(repo_root / "params.yaml", overrides)
    validation, blank = load_suite(params, "validation"), load_suite(params, "validation-blank")
    assert len(validation.records) == 4 and blank.blanks == "validation"
    assert [r["id"] for r in blank.records] == [r["id"] for r in validation.records]
    assert {r["image"] for r in blank.records} == {to_png_bytes(Image.new("RGB", (8, 8)))}
    assert parse_suites("all", validation=True)[-2:] == ["validation", "validation-blank"]


def test_vqa_rad_carries_its_rewording_pairs_and_the_perturbed_suites_none(params, tmp_path):
    """Pairs from qid_linked_id + phrase_type: each rewording with its group's one original; a group of two originals
    (which one is reworded?) and a rewording whose original is not in the split give none."""

    def linked(record_id: str, group: str, phrase: str, image: bytes) -> dict:
        return _record(record_id, image) | {"qid_linked_id": group, "phrase_type": phrase}

    png, other = _png(10), _png(20)
    test = [linked("o1", "g1", "test_freeform", png), linked("r1", "g1", "test_para", png),
            linked("o2", "g2", "test_freeform", png), linked("o3", "g2", "test_freeform", png),
            linked("r2", "g2", "test_para", png), linked("r3", "g3", "test_para", other),
            linked("r4", "g1", "test_para", png), linked("alone", "g4", "test_freeform", other)]  # fmt: skip
    write_splits(tmp_path / "data", "toy", {"test": test})
    assert load_suite(params, "vqa-rad").pairs == (("o1", "r1"), ("o1", "r4"))
    assert all(load_suite(params, name).pairs == () for name in ("swap", "blank", "expert-prompt"))


def test_med_halt_pairs_every_question_with_an_image_of_the_vqa_eval_split(params):
    suite = load_suite(params, "med-halt")
    eval_images = set(distinct_images(load_suite(params, "vqa-rad").records))
    assert [r["id"] for r in suite.records] == [f"nonsense{i}" for i in range(4)]
    assert all(r["image"] in eval_images for r in suite.records)
    assert [r["image"] for r in suite.records] == [r["image"] for r in load_suite(params, "med-halt").records]


def test_swap_suite_is_seeded_by_eval_seed(params, repo_root):
    swapped = [r["image"] for r in load_suite(params, "swap").records]
    assert swapped == [r["image"] for r in load_suite(params, "swap").records]
    other = load_params(repo_root / "params.yaml", {**_overrides_of(params), "eval.seed": 5})
    assert swapped != [r["image"] for r in load_suite(other, "swap").records]


def _overrides_of(params) -> dict:
    keys = ("data.root", "data.prompt_prefix", "eval.expert_prompt", "data.vqa.dataset", "data.vqa.eval_split",
            "data.ood.dataset", "data.ood.split", "data.nonsense.dataset", "data.nonsense.split")  # fmt: skip
    flat = params.flat()
    return {key: flat[key] for key in keys}


def test_expert_prompt_comes_before_the_prefix_and_the_question_in_the_rendered_prompt(params):
    from med_idefics.modeling.tiny import build_processor, build_tokenizer

    cfg = params.model.tiny
    processor = build_processor(build_tokenizer(["question"], cfg.vocab_size), cfg)
    suite = load_suite(params, "expert-prompt")
    assert suite.prefix == f"{EXPERT} Answer briefly."
    record = suite.records[0]
    prompt = render_prompt(processor, record["question"], suite.prefix)
    assert f"{EXPERT} Answer briefly. {record['question']}" in prompt
    assert EXPERT not in render_prompt(processor, record["question"], load_suite(params, "vqa-rad").prefix)
    assert expert_prefix(EXPERT, "") == EXPERT


def test_parse_suites():
    assert parse_suites("all") == list(SUITES) == list(SUITE_NAMES)
    assert KNOWN_SUITE_NAMES == KNOWN_SUITES  # what `compare --suite` accepts: every suite it can print
    assert parse_suites("swap, vqa-rad,swap") == ["swap", "vqa-rad"]
    with pytest.raises(ConfigError, match="unknown suite"):
        parse_suites("vqa-rad,pathvqa")


# ---------------------------------------------------------------------------------------------------------- med-halt


@pytest.mark.parametrize(
    "answer",
    [
        "I do not know",
        "i don't know.",
        "I don\u2019t know",
        "not sure",
        "I'm unsure about that",
        "This question is invalid.",
        "that is nonsense",
        "the question does not make sense",
        "It doesn't make sense to ask this",
        "not applicable",
        "no answer",
        "unanswerable",
        "I cannot answer this question",
        "unable to determine from the image",
        "It is not possible to tell.",
        "cannot be determined",
        "unknown",
        "N/A",
        "there is no such thing as a liver phone number",
        "mermaids are not real",
    ],
)
def test_abstentions(answer):
    assert is_abstention(answer)


@pytest.mark.parametrize(
    "answer",
    [
        # the paper's model on its five Med-HALT fake questions (cs231n-results/eval_fake_questions_results.json)
        "chorea",
        "well, if you think about it, it's not that far-fetched",
        "1. transverse colon resection",
        "a patient with a normal brain",
        "the patient has been instructed to perform imaginary exercises with the incentive spirometer.",
        # playing along, or findings that merely contain a trigger word's letters or a bare negation
        "yes",
        "no",
        "none",
        "two",
        "malignancy cannot be excluded",
        "mass of unknown origin",
        "invalidated stent",
        "knowledge of the liver",
        "",
    ],
)
def test_answers_that_play_along_are_hallucinations(answer):
    assert not is_abstention(answer)


def test_the_papers_five_fake_question_answers_are_all_hallucinations(repo_root):
    import json

    path = repo_root.parent / "shared" / "reference" / "cs231n-results" / "eval_fake_questions_results.json"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    answers = [row["predicted_answer"] for row in json.loads(path.read_text())]
    assert len(answers) == 5
    assert summarize_abstention([{"prediction": a} for a in answers], seed=0, resamples=1000)["abstention_rate"] == 0


def test_summarize_abstention():
    rows = [{"prediction": p} for p in ("I do not know", "chorea", "invalid question", "yes")]
    summary = summarize_abstention(rows, seed=0, resamples=1000)
    assert summary["n"] == 4 and summary["n_abstained"] == 2
    assert summary["abstention_rate"] == 0.5 and summary["hallucination_rate"] == 0.5
    assert 0 <= summary["abstention_rate_ci_low"] <= 0.5 <= summary["abstention_rate_ci_high"] <= 1
    assert summary["hallucination_rate_ci_low"] == pytest.approx(1 - summary["abstention_rate_ci_high"])
