"""The training collator: loss on the answer tokens only; and the left-padded generation batch."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from med_idefics.data.collator import IGNORE_INDEX, VqaCollator, build_generation_batch, render_prompt
from med_idefics.data.images import image_from_bytes
from med_idefics.data.schema import DatasetError
from med_idefics.prompts import END_OF_UTTERANCE


def answer_ids(processor, answer: str) -> list[int]:
    return processor.tokenizer(answer, add_special_tokens=False)["input_ids"]


def test_unmasked_labels_are_exactly_the_answers(tiny_processor, vqa_records):
    batch = VqaCollator(tiny_processor)(vqa_records)
    eou = tiny_processor.tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
    for labels, record in zip(batch["labels"], vqa_records, strict=True):
        kept = labels[labels != IGNORE_INDEX].tolist()
        assert kept == [*answer_ids(tiny_processor, record["answer"]), eou]
        assert tiny_processor.tokenizer.decode(kept, skip_special_tokens=True) == record["answer"].lower()


def test_prompt_image_and_padding_tokens_are_masked(tiny_processor, vqa_records):
    collator = VqaCollator(tiny_processor)
    batch = collator(vqa_records)
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    assert (labels[ids == collator.image_token_id] == IGNORE_INDEX).all()
    for i, record in enumerate(vqa_records):
        n_prompt = len(tiny_processor(text=[render_prompt(tiny_processor, record["question"])])["input_ids"][0])
        assert (labels[i, :n_prompt] == IGNORE_INDEX).all()
        assert labels[i, n_prompt] != IGNORE_INDEX  # the answer starts right after `Assistant:`
    # right padding: each row is real tokens, then padding
    lengths = mask.sum(dim=1)
    assert torch.equal(mask, (torch.arange(mask.shape[1]) < lengths[:, None]).long())
    assert (ids[mask == 0] == tiny_processor.tokenizer.pad_token_id).all()
    assert batch["pixel_values"].shape == (len(vqa_records), 1, 3, 64, 64)


def test_loss_ignores_the_prompt(tiny_model, tiny_processor, vqa_records):
    """Changing only the question changes the inputs but leaves the supervised tokens alone."""
    collator = VqaCollator(tiny_processor)
    record = vqa_records[0]
    batch = collator([record, {**record, "question": "Which organ is shown?"}])
    first, second = batch["labels"]
    assert first[first != IGNORE_INDEX].tolist() == second[second != IGNORE_INDEX].tolist()
    assert not torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    assert torch.isfinite(tiny_model(**batch).loss)


def test_prompt_prefix_goes_into_the_user_turn_only(tiny_processor, vqa_records):
    plain = VqaCollator(tiny_processor)(vqa_records[:2])
    prefixed = VqaCollator(tiny_processor, prompt_prefix="Answer briefly.")(vqa_records[:2])
    assert prefixed["input_ids"].shape[1] > plain["input_ids"].shape[1]
    for a, b in zip(plain["labels"], prefixed["labels"], strict=True):
        assert a[a != IGNORE_INDEX].tolist() == b[b != IGNORE_INDEX].tolist()


def test_encode_then_pad_equals_call_and_pads_images_of_different_sizes(tiny_processor, make_vqa_records):
    collator = VqaCollator(tiny_processor)
    square = make_vqa_records([("Is there a lesion?", "yes")], size=64)
    small = make_vqa_records([("Which organ is shown?", "chest")], seed=1, size=32)
    batch = collator.pad(collator.encode(square) + collator.encode(small))
    assert batch["pixel_values"].shape == (2, 1, 3, 64, 64)
    assert batch["pixel_attention_mask"][1, 0, :32, :32].all()
    assert not batch["pixel_attention_mask"][1, 0, 32:, :].any()
    whole = collator(square + square)
    assert torch.equal(collator.pad(collator.encode(square) * 2)["input_ids"], whole["input_ids"])


def test_record_without_image_is_refused_by_id(tiny_processor, vqa_records):
    with pytest.raises(DatasetError, match="train-0"):
        VqaCollator(tiny_processor)([{**vqa_records[0], "image": None}])


def test_generation_batch_is_left_padded_and_shares_the_training_prompt(tiny_processor, vqa_records):
    images = [image_from_bytes(r["image"]) for r in vqa_records]
    questions = [r["question"] for r in vqa_records]
    batch = build_generation_batch(tiny_processor, images, questions, prefix="Answer briefly.")
    mask = batch["attention_mask"]
    lengths = mask.sum(dim=1)
    width = mask.shape[1]
    assert torch.equal(mask, (torch.arange(width) >= width - lengths[:, None]).long())  # padding on the left
    assert lengths.min() < width  # the questions differ in length, so some row is padded
    assistant = tiny_processor.tokenizer("Assistant:", add_special_tokens=False)["input_ids"]
    assert (batch["input_ids"][:, -len(assistant) :] == torch.tensor(assistant)).all()

    training = VqaCollator(tiny_processor, prompt_prefix="Answer briefly.")(vqa_records)
    for i in range(len(vqa_records)):
        prompt = batch["input_ids"][i, width - lengths[i] :]
        assert torch.equal(training["input_ids"][i, : len(prompt)], prompt)
        first_answer_label = training["labels"][i, len(prompt)]
        assert first_answer_label == answer_ids(tiny_processor, vqa_records[i]["answer"])[0]


def test_generation_batch_checks_lengths(tiny_processor):
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        build_generation_batch(tiny_processor, [Image.new("RGB", (64, 64))] * 2, ["is it normal?"])
