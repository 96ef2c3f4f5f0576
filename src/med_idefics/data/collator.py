"""Records → model batches, with the prompt format of :mod:`med_idefics.prompts` rendered by the processor's chat
template.

Training batches (:class:`VqaCollator`) are right-padded and carry ``labels`` that are -100 everywhere except on the
answer tokens and the ``<end_of_utterance>`` that closes them: no loss on the prompt, the image tokens, the padding or
whatever the template writes after the answer. (The Idefics2 fine-tuning tutorial set padding labels to the image
token id, which current transformers does train on — hence -100.)

Generation batches (:func:`build_generation_batch`) are left-padded prompts ending in ``Assistant:``.
"""

from __future__ import annotations

import copy
import hashlib
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

from med_idefics.data.feature_store import FeatureStore, image_digest, pad_features
from med_idefics.data.images import image_from_bytes
from med_idefics.data.schema import DatasetError
from med_idefics.prompts import END_OF_UTTERANCE, chat_messages

IGNORE_INDEX = -100  # labels the loss skips (torch cross-entropy's ignore_index)
CACHE_BYTES = 512 * 2**20  # processed images kept per collator (64x64 demo images: all of them; 980px: ~45)


@dataclass
class UnknownWords:
    """What a split's encoded texts hold of the tokenizer's unknown token (a word-level tokenizer's ``<unk>``)."""

    records: int = 0  # records with an unknown word in their question or answer
    answers: list[str] = field(default_factory=list)  # ids of the records whose answer (labels) holds one
    words: Counter = field(default_factory=Counter)  # unknown word → records using it
    answer_words: Counter = field(default_factory=Counter)  # the same, in the answers only


def describe_words(words: Counter, limit: int = 12) -> str:
    """``'pneumothorax' (2), 'small' (1), …``"""
    shown = ", ".join(f"{word!r} ({count})" for word, count in words.most_common(limit))
    return shown + (", …" if len(words) > limit else "")


def render_prompt(processor: ProcessorMixin, question: str, prefix: str = "", answer: str | None = None) -> str:
    """The chat text of one example: with ``answer`` the full training text, without it the generation prompt
    (ending in ``Assistant:``). The ``<image>`` placeholder is expanded by the processor."""
    messages = chat_messages(question, answer, prefix)
    return processor.apply_chat_template(messages, add_generation_prompt=answer is None, tokenize=False)


def record_image(record: Mapping) -> Image.Image:
    if record.get("image") is None:
        raise DatasetError(f"record {record.get('id', '?')}: no image; VQA training and generation need one")
    return image_from_bytes(record["image"])


class VqaCollator:
    """``records`` (schema dicts: image PNG bytes, question, answer) → a right-padded training batch with
    ``input_ids``, ``attention_mask``, ``pixel_values``, ``pixel_attention_mask`` and ``labels``.

    Stage 1 uses the caption records as they are (their question is the caption prompt); stage 2 and single-stage
    use VQA records with the optional ``prompt_prefix`` from params. :meth:`encode` and :meth:`pad` are the two
    halves of ``__call__``, so a caller may encode a dataset once and only pad per step (the tiny base's
    pretraining); the LoRA stages encode the texts once (:meth:`encode_texts`) and the images per step.
    """

    def __init__(self, processor: ProcessorMixin, prompt_prefix: str = "") -> None:
        self.processor = processor
        self.prompt_prefix = prompt_prefix
        tokenizer = processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id
        self.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
        self.end_of_utterance_id = tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
        if self.pad_token_id is None:
            raise ValueError("the processor's tokenizer has no pad token; set tokenizer.pad_token before training")
        self._image_cache: OrderedDict[bytes | None, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cache_bytes = 0
        self.features: FeatureStore | None = None

    def with_features(self, store: FeatureStore) -> VqaCollator:
        """A copy whose batches carry the vision encoder's cached outputs (``vision_hidden_states``,
        ``patch_attention_mask``: :mod:`med_idefics.modeling.vision_cache`) instead of processed pixels: every
        image of the records it collates must be in ``store``."""
        twin = copy.copy(self)
        twin.features = store
        return twin

    def __call__(self, records: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        return self.pad(self.encode(records))

    def encode(self, records: Sequence[Mapping]) -> list[dict[str, torch.Tensor]]:
        """One unpadded example per record: 1-D ``input_ids``/``labels``, ``pixel_values`` (images, C, H, W)."""
        return [self.with_image(text) for text in self.encode_texts(records)]

    def encode_texts(self, records: Sequence[Mapping], chunk: int = 256) -> list[dict]:
        """The text half of :meth:`encode`, for a whole split at once: per record its 1-D ``input_ids`` and
        ``labels``, with its ``id`` and (still unprocessed) ``image`` bytes for :meth:`with_image`.

        Raises :class:`DatasetError` naming the first record this collator cannot train on — no image, a prompt
        whose tokens are not a prefix of the training text's, no ``<end_of_utterance>`` after the answer — so a
        training stage encodes its splits once before any model is loaded: a bad record fails there, not mid-epoch
        (where a resume would replay the failure), and each step only pads (:meth:`collate_texts`). Images are left
        to the step: a split of large images would not fit in memory processed."""
        texts = []
        for start in range(0, len(records), chunk):
            part = records[start : start + chunk]
            for record in part:
                if record.get("image") is None:
                    record_image(record)  # raises, naming the record
            full = [render_prompt(self.processor, r["question"], self.prompt_prefix, r["answer"]) for r in part]
            prompts = [render_prompt(self.processor, r["question"], self.prompt_prefix) for r in part]
            batch = self.processor(text=full, padding=True, padding_side="right", return_tensors="pt")
            prompt_ids = self.processor(text=prompts)["input_ids"]
            for i, record in enumerate(part):
                length = int(batch["attention_mask"][i].sum())  # right padding: the real tokens come first
                input_ids = batch["input_ids"][i, :length]
                labels = self.answer_labels(input_ids, prompt_ids[i], record)
                texts.append(
                    {"id": record.get("id"), "image": record["image"], "input_ids": input_ids, "labels": labels}
                )
        return texts

    def unknown_words(self, records: Sequence[Mapping], texts: Sequence[Mapping]) -> UnknownWords:
        """Which of ``records`` (encoded as ``texts`` by :meth:`encode_texts`) hold words the tokenizer turns into
        its unknown token, and which words. The tiny base's word-level tokenizer knows only the words of the data it
        was built on (and turns the chat template's last newline into ``<unk>``, outside question and answer); a
        subword tokenizer with byte fallback (Idefics2-8b's) never produces it."""
        unknown_id = self.processor.tokenizer.unk_token_id
        found = UnknownWords()
        if unknown_id is None:
            return found
        for record, text in zip(records, texts, strict=True):
            if not (text["input_ids"] == unknown_id).any():
                continue
            words = self._unknown_in([self.prompt_prefix, record["question"], record["answer"]])
            if words:
                found.records += 1
                found.words.update(words)
            if (text["labels"] == unknown_id).any():  # the answer itself: what training would teach
                found.answers.append(str(record.get("id")))
                found.answer_words.update(self._unknown_in([record["answer"]]))
        return found

    def _unknown_in(self, texts: Iterable[str]) -> list[str]:
        """The words of ``texts`` (lower-cased, once per text) that encode to the unknown token, read back from the
        tokens' character offsets."""
        tokenizer = self.processor.tokenizer
        found = set()
        for text in filter(None, texts):
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
                if token == tokenizer.unk_token_id and text[start:end].strip():
                    found.add(text[start:end].strip().lower())
        return sorted(found)

    def with_image(self, text: Mapping) -> dict[str, torch.Tensor]:
        """A text-encoded record (:meth:`encode_texts`) as a model example: its image processed (cached)."""
        pixel_values, pixel_attention_mask = self.image_features(text)
        return {
            "input_ids": text["input_ids"],
            "labels": text["labels"],
            "pixel_values": pixel_values,
            "pixel_attention_mask": pixel_attention_mask,
        }

    def collate_texts(self, texts: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        """A training batch from text-encoded records: the Trainer's ``data_collator`` over :meth:`encode_texts`."""
        if self.features is not None:
            batch = self.pad([{"input_ids": t["input_ids"], "labels": t["labels"]} for t in texts], images=False)
            return batch | pad_features([self.features.load(image_digest(t["image"])) for t in texts])
        return self.pad([self.with_image(text) for text in texts])

    def image_features(self, record: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """The processed image of a record, cached by its bytes: VQA datasets ask several questions per image, and
        the image processor costs more than the model's step on small bases. The cache holds at most
        ``CACHE_BYTES`` of tensors (least recently used first out)."""
        key = hashlib.blake2b(record["image"], digest_size=16).digest() if record.get("image") else None
        if key is not None and key in self._image_cache:
            self._image_cache.move_to_end(key)
            return self._image_cache[key]
        features = self.processor(images=[[record_image(record)]], return_tensors="pt")
        value = (features["pixel_values"][0], features["pixel_attention_mask"][0])
        self._image_cache[key] = value
        self._cache_bytes += sum(t.numel() * t.element_size() for t in value)
        while self._cache_bytes > CACHE_BYTES and self._image_cache:
            _, evicted = self._image_cache.popitem(last=False)
            self._cache_bytes -= sum(t.numel() * t.element_size() for t in evicted)
        return value

    def answer_labels(self, input_ids: torch.Tensor, prompt_ids: Sequence[int], record: Mapping) -> torch.Tensor:
        """``input_ids`` with every token outside the answer (+ its closing ``<end_of_utterance>``) set to -100."""
        n_prompt = len(prompt_ids)
        if input_ids[:n_prompt].tolist() != list(prompt_ids):
            raise DatasetError(
                f"record {record.get('id', '?')}: the tokenized prompt is not a prefix of the tokenized training text; "
                "the tokenizer merges tokens across the `Assistant:` boundary, so prompt masking would be wrong. "
                "Fix or drop the record (its answer's first characters)"
            )
        ends = (input_ids[n_prompt:] == self.end_of_utterance_id).nonzero()
        if len(ends) == 0:
            raise DatasetError(f"record {record.get('id', '?')}: no {END_OF_UTTERANCE} after the answer (truncated?)")
        end = n_prompt + int(ends[0]) + 1
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[n_prompt:end] = input_ids[n_prompt:end]
        labels[labels == self.image_token_id] = IGNORE_INDEX
        return labels

    def pad(self, examples: Sequence[Mapping[str, torch.Tensor]], images: bool = True) -> dict[str, torch.Tensor]:
        """Right-pad encoded examples into a batch (images zero-padded to the largest, masked out)."""
        width = max(len(e["input_ids"]) for e in examples)

        def right(t: torch.Tensor, value: int) -> torch.Tensor:
            return F.pad(t, (0, width - len(t)), value=value)

        batch = {
            "input_ids": torch.stack([right(e["input_ids"], self.pad_token_id) for e in examples]),
            "attention_mask": torch.stack([right(torch.ones_like(e["input_ids"]), 0) for e in examples]),
            "labels": torch.stack([right(e["labels"], IGNORE_INDEX) for e in examples]),
        }
        if not images:
            return batch
        height = max(e["pixel_values"].shape[-2] for e in examples)
        breadth = max(e["pixel_values"].shape[-1] for e in examples)

        def image(t: torch.Tensor) -> torch.Tensor:
            return F.pad(t, (0, breadth - t.shape[-1], 0, height - t.shape[-2]), value=0)

        batch["pixel_values"] = torch.stack([image(e["pixel_values"]) for e in examples])
        batch["pixel_attention_mask"] = torch.stack([image(e["pixel_attention_mask"]) for e in examples])
        return batch


def build_generation_batch(
    processor: ProcessorMixin, images: Sequence[Image.Image], questions: Sequence[str], prefix: str = ""
) -> BatchFeature:
    """A left-padded batch of generation prompts (``…<end_of_utterance>\\nAssistant:``) for ``model.generate``;
    the new tokens start at ``batch["input_ids"].shape[1]``."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    prompts = [render_prompt(processor, question, prefix) for question in questions]
    return processor(
        text=prompts, images=[[image] for image in images], padding=True, padding_side="left", return_tensors="pt"
    )
