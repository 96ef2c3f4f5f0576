"""How a variant answers: the base at the evaluation precision with an optional LoRA adapter on top, and batched
greedy generation up to ``<end_of_utterance>``.

Shared by the evaluate stage and the packaged model that the registry serves, so a served answer is produced exactly
as an evaluated one (same precision, same prompt, same decoding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from med_idefics.config import QuantizationConfig
from med_idefics.prompts import END_OF_UTTERANCE


def load_adapted_model(
    base_dir: str | Path,
    adapter_dir: str | Path | None,
    quantization: QuantizationConfig,
    attn_implementation: str | None = None,
):
    """The base in ``base_dir`` (or what its pointer names) at the training precision
    (:func:`~med_idefics.modeling.loading.base_dtype`), on this process's GPU when there is one, with the adapter on
    top; in eval mode."""
    from med_idefics.modeling.adapters import check_adapter_fits
    from med_idefics.modeling.loading import load_base_model, local_device

    device = local_device()
    model = load_base_model(
        base_dir, quantization, attn_implementation, device_map=None if device == "cpu" else {"": device}
    )
    if adapter_dir is not None:
        from peft import PeftModel

        check_adapter_fits(Path(adapter_dir), model)
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


class AdapterSwitch:
    """One base, loaded once, answering as several variants in turn: each adapter is loaded next to the current one,
    made active, and the previous one deleted (peft ``load_adapter`` / ``set_adapter`` / ``delete_adapter``), so a
    process that evaluates several variants never loads the base twice. ``None`` is the bare base (the adapter layers
    disabled)."""

    def __init__(self, base_dir: str | Path, quantization: QuantizationConfig, attn_implementation: str | None = None):
        self.model = load_adapted_model(base_dir, None, quantization, attn_implementation)
        self.active: str | None = None
        self._loaded = 0

    def use(self, adapter_dir: str | Path | None):
        """The model answering as ``adapter_dir`` (None: the base), in eval mode."""
        from peft import PeftModel

        from med_idefics.modeling.adapters import check_adapter_fits

        if adapter_dir is None:
            if isinstance(self.model, PeftModel):
                self.model.base_model.disable_adapter_layers()
            return self.model.eval()
        check_adapter_fits(Path(adapter_dir), self.model)
        self._loaded += 1
        name = f"variant-{self._loaded}"
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(adapter_dir), adapter_name=name)
            self.model.set_adapter(name)
            self.model.delete_adapter(self.active)
            self.model.base_model.enable_adapter_layers()
        else:
            self.model = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=name)
        self.active = name
        return self.model.eval()


def stop_token_ids(processor) -> list[int]:
    """``<end_of_utterance>`` (the chat turn's end: what fine-tuned answers stop at) and the tokenizer's eos."""
    tokenizer = processor.tokenizer
    ids = [tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE), tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None and i != tokenizer.unk_token_id))


def _image(record: Mapping) -> Image.Image:
    """A record's image: a PIL image as it is (serving decodes requests itself), else the schema's PNG bytes."""
    from med_idefics.data.collator import record_image

    image = record.get("image")
    return image if isinstance(image, Image.Image) else record_image(record)


class AnsweringBatches:
    """Chunk ``i`` of ``records`` as a left-padded generation batch (a map-style dataset of whole batches, so a
    DataLoader's workers prepare the next images while the model answers): the processor's pixels, or — with a vision
    ``store`` holding the images — the prompts alone plus the cached encoder outputs (no image processing)."""

    def __init__(self, processor, records: Sequence[Mapping], prefix: str, batch_size: int, store=None) -> None:
        self.processor, self.records, self.prefix = processor, records, prefix
        self.batch_size, self.store = batch_size, store

    def __len__(self) -> int:
        return -(-len(self.records) // self.batch_size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from med_idefics.data.collator import build_generation_batch, render_prompt

        chunk = self.records[index * self.batch_size : (index + 1) * self.batch_size]
        questions = [r["question"] for r in chunk]
        if self.store is None:
            return dict(build_generation_batch(self.processor, [_image(r) for r in chunk], questions, self.prefix))
        from med_idefics.data.feature_store import image_digest, pad_features

        prompts = [render_prompt(self.processor, question, self.prefix) for question in questions]
        batch = self.processor(text=prompts, padding=True, padding_side="left", return_tensors="pt")
        features = [self.store.load(image_digest(r["image"])) for r in chunk]
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]} | pad_features(features)


def generate_answers(
    model,
    processor,
    records: Sequence[Mapping],
    prefix: str,
    batch_size: int,
    max_new_tokens: int,
    description: str = "answering",
    show_progress: bool = True,
    store=None,
    workers: int = 0,
    **generate_kwargs: Any,
) -> list[str]:
    """The raw generation for each record (``image``: PNG bytes or a PIL image; ``question``), up to its stop token,
    special tokens dropped: greedy, in left-padded batches of ``batch_size``, with a progress bar unless
    ``show_progress`` is false. ``store``: a :class:`~med_idefics.data.feature_store.FeatureStore` holding every
    record's image (:func:`med_idefics.modeling.vision_cache.fill`); ``workers``: processes preparing the batches
    ahead (params ``eval.dataloader_workers``). Extra keyword arguments go to ``model.generate``."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from med_idefics.modeling.vision_cache import BATCH_KEYS, connector_inputs

    stops = stop_token_ids(processor)
    tokenizer = processor.tokenizer
    batches = AnsweringBatches(processor, records, prefix, batch_size, store)
    loader = DataLoader(batches, batch_size=None, num_workers=workers)
    raws: list[str] = []
    with (
        tqdm(total=len(records), desc=description, unit="answer", disable=not show_progress) as progress,
        torch.inference_mode(),
    ):
        for batch in loader:
            batch = {key: value.to(model.device) for key, value in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            if BATCH_KEYS[0] in batch:
                batch |= connector_inputs(model, *(batch.pop(key) for key in BATCH_KEYS))
            output = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
                **generate_kwargs,
            )
            for tokens in output[:, batch["input_ids"].shape[1] :].tolist():
                end = next((i for i, token in enumerate(tokens) if token in stops), len(tokens))
                raws.append(tokenizer.decode(tokens[:end], skip_special_tokens=True))
            progress.update(len(output))
    return raws
