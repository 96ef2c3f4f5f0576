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


def generate_answers(
    model,
    processor,
    records: Sequence[Mapping],
    prefix: str,
    batch_size: int,
    max_new_tokens: int,
    description: str = "answering",
    show_progress: bool = True,
    **generate_kwargs: Any,
) -> list[str]:
    """The raw generation for each record (``image``: PNG bytes or a PIL image; ``question``), up to its stop token,
    special tokens dropped: greedy, in left-padded batches of ``batch_size``, with a progress bar unless
    ``show_progress`` is false. Extra keyword arguments go to ``model.generate``."""
    import torch
    from tqdm.auto import tqdm

    from med_idefics.data.collator import build_generation_batch

    stops = stop_token_ids(processor)
    tokenizer = processor.tokenizer
    raws: list[str] = []
    with (
        tqdm(total=len(records), desc=description, unit="answer", disable=not show_progress) as progress,
        torch.inference_mode(),
    ):
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            batch = build_generation_batch(
                processor, [_image(r) for r in chunk], [r["question"] for r in chunk], prefix
            )
            batch = batch.to(model.device)
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
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
            progress.update(len(chunk))
    return raws
