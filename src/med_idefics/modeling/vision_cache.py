"""The vision-feature cache (params ``vision_cache``): the frozen vision encoder runs once per image, not once per
question, epoch, suite and variant.

What is cached is the encoder's *last hidden state* over the image's patch grid — before the connector (modality
projection + perceiver resampler), which LoRA trains and which therefore runs on every step. (transformers'
``image_hidden_states`` / ``mm_encoder_outputs`` are the connector's output: they cannot be cached for training.)
Idefics2's own path is ``get_image_features``: pixel mask → patch mask (a patch counts when all its pixels are real) →
``vision_model`` → ``connector``; :func:`encode_images` is its first half, :func:`connector_inputs` its second,
handing the result to the model the way the installed transformers takes pre-computed image features
(``mm_encoder_outputs`` from 5.2x, ``image_hidden_states`` in 5.17). A cache hit runs neither the image processor
(the resize and normalisation at 980 px that dominate CPU time) nor the encoder.

- Training: :func:`use_vision_cache` fills the store with the split's images before the first step, then the
  collator sends ``vision_hidden_states`` + ``patch_attention_mask`` instead of pixels and a forward pre-hook on the
  model (:func:`accept_cached_features`) turns them into the connector's output inside the forward pass, so the
  gradient reaches the connector's LoRA weights as it does from pixels.
- Answering: :func:`med_idefics.modeling.generation.generate_answers` takes the store and passes the connector's
  output to ``generate``.

A split is cached only when all its images fit in ``vision_cache.max_gib`` (counted at the largest image the
processor makes); otherwise it runs as before, and says so.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from med_idefics.config import ConfigError, Params
from med_idefics.data.feature_store import FeatureStore, image_digest, pad_features

BATCH_KEYS = ("vision_hidden_states", "patch_attention_mask")
_HOOK_ATTR = "_med_idefics_vision_cache_hook"
_GUARD_ATTR = "_med_idefics_vision_cache_guard"


def unwrap(model):
    """The ``Idefics2ForConditionalGeneration`` inside a PEFT (or compiled) wrapper."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def vision_dtype(model) -> torch.dtype:
    return next(unwrap(model).model.vision_model.parameters()).dtype


def context_of(base_dir: str | Path, processor, model) -> dict[str, Any]:
    """What decides the encoder's output for an image, besides the image: the cache folder's key."""
    from med_idefics.modeling.loading import base_digest

    inner = unwrap(model)
    settings = {k: v for k, v in processor.image_processor.to_dict().items() if not k.startswith("_")}
    return {
        "base": base_digest(base_dir),
        "image_processor": settings,
        "dtype": str(vision_dtype(model)),
        "attn_implementation": str(inner.config.vision_config._attn_implementation),
    }


def bytes_per_image(model, processor) -> int:
    """The largest file an image can make: a longest-edge-square image's patches x width x dtype size."""
    vision = unwrap(model).config.vision_config
    side = processor.image_processor.size["longest_edge"] // vision.patch_size
    return side * side * vision.hidden_size * torch.finfo(vision_dtype(model)).bits // 8 + 4096


def open_store(params: Params, model, processor, base_dir: str | Path | None = None) -> FeatureStore | None:
    """The store for this base and processor, or None when ``vision_cache.enabled`` is false."""
    cfg = params.vision_cache
    if not cfg.enabled:
        return None
    if processor.image_processor.do_image_splitting:
        raise ConfigError(
            "vision_cache.enabled needs model.do_image_splitting: false (one view per image, as the paper); "
            "turn one of them off"
        )
    context = context_of(base_dir or params.model.base_dir, processor, model)
    return FeatureStore(cfg.dir, context, int(cfg.max_gib * 2**30))


@torch.inference_mode()
def encode_images(model, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> list[tuple]:
    """(hidden over the image's own patch grid, (rows, columns)) per image of a processor batch (batch, 1, C, H, W)."""
    inner = unwrap(model).model
    device = next(inner.vision_model.parameters()).device
    pixels = pixel_values.flatten(0, 1).to(device, vision_dtype(model))
    mask = pixel_attention_mask.flatten(0, 1).to(device)
    size = inner.config.vision_config.patch_size
    patches = mask.unfold(1, size, size).unfold(2, size, size).sum(dim=(-1, -2)) == size * size
    hidden = inner.vision_model(pixel_values=pixels, patch_attention_mask=patches).last_hidden_state
    rows, columns = patches.shape[1:]
    result = []
    for features, grid in zip(hidden.reshape(len(pixels), rows, columns, -1), patches, strict=True):
        h, w = int(grid.any(1).sum()), int(grid.any(0).sum())
        result.append((features[:h, :w].reshape(h * w, -1), (h, w)))
    return result


class ImageBatch:
    """Image bytes → the processor's padded pixel batch (picklable: runs in DataLoader workers)."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, items: Sequence[tuple[str, bytes]]) -> tuple[list[str], dict[str, torch.Tensor]]:
        from med_idefics.data.collator import record_image

        images = [[record_image({"image": image})] for _, image in items]
        batch = self.processor(images=images, return_tensors="pt")
        return [digest for digest, _ in items], {k: batch[k] for k in ("pixel_values", "pixel_attention_mask")}


def fill(store: FeatureStore, model, processor, images: Sequence[bytes], what: str, batch_size: int = 8,
         workers: int = 0) -> bool:  # fmt: skip
    """Cache the encoder's output for every image of ``images`` not yet cached (a corrupted file is recomputed);
    False, and nothing cached, when they do not fit in the store's bound."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    by_digest = {image_digest(image): image for image in images if image}
    if not store.admit(by_digest, bytes_per_image(model, processor)):
        print(
            f"vision cache: the {len(by_digest)} images of {what} do not fit in vision_cache.max_gib "
            f"({store.max_bytes / 2**30:.1f} GiB at up to {bytes_per_image(model, processor) / 2**20:.1f} MiB "
            "each): running uncached"
        )
        return False
    missing = [(digest, image) for digest, image in by_digest.items() if not store.verified(digest)]
    if missing:
        loader = DataLoader(missing, batch_size=batch_size, num_workers=workers, collate_fn=ImageBatch(processor))
        with tqdm(total=len(missing), desc=f"vision cache: {what}", unit="image") as progress:
            for digests, batch in loader:
                for digest, (hidden, grid) in zip(digests, encode_images(model, **batch), strict=True):
                    store.save(digest, hidden, grid)
                progress.update(len(digests))
    return True


def connector_inputs(model, vision_hidden_states: torch.Tensor, patch_attention_mask: torch.Tensor) -> dict:
    """The model keyword that carries pre-computed image features, holding the connector's output for the cached
    encoder states of a batch (batch, images, patches, width) with their mask (batch, images, rows, columns)."""
    inner = unwrap(model).model
    batch, images = patch_attention_mask.shape[:2]
    mask = patch_attention_mask.reshape(batch * images, -1)
    hidden = vision_hidden_states.reshape(batch * images, mask.shape[1], -1)
    real = mask.any(dim=1)  # images a sample does not have are all padding
    features = inner.connector(hidden[real].to(vision_dtype(model)), attention_mask=mask[real])
    if "mm_encoder_outputs" in inspect.signature(type(inner).forward).parameters:  # transformers >= 5.2x
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        counts = real.view(batch, images).sum(dim=1).tolist()
        pooled = [f.reshape(-1, f.shape[-1]) for f in features.split(counts)]
        output = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)
        return {"mm_encoder_outputs": {"image": output}}
    if getattr(inner, _GUARD_ATTR, None) is None:  # transformers 5.17: see _only_where_image_tokens_are
        setattr(inner, _GUARD_ATTR, inner.register_forward_pre_hook(_only_where_image_tokens_are, with_kwargs=True))
    return {"image_hidden_states": features.reshape(-1, features.shape[-1])}


def _only_where_image_tokens_are(module, args, kwargs):
    """transformers 5.17's ``generate`` passes ``image_hidden_states`` to every decoding step (5.2x drops
    ``mm_encoder_outputs`` after the prompt), where a generated ``<image>`` token would take an image feature the
    pixel path never gives it: features go only to a forward whose ``<image>`` tokens match them, as 5.2x checks."""
    features, input_ids = kwargs.get("image_hidden_states"), kwargs.get("input_ids")
    if features is None or input_ids is None:
        return None
    if int((input_ids == module.config.image_token_id).sum()) * features.shape[-1] != features.numel():
        kwargs["image_hidden_states"] = None
        return args, kwargs
    return None


def _take_cached_features(module, args, kwargs):
    if kwargs.get(BATCH_KEYS[0]) is None:
        return None
    hidden, mask = (kwargs.pop(key) for key in BATCH_KEYS)
    kwargs.update(connector_inputs(module, hidden, mask))
    return args, kwargs


def accept_cached_features(model) -> None:
    """Let ``model(**batch)`` take a batch with ``vision_hidden_states`` + ``patch_attention_mask`` instead of pixels
    (the connector then runs inside the forward pass, under autograd). Idempotent."""
    inner = unwrap(model)
    if getattr(inner, _HOOK_ATTR, None) is None:
        setattr(inner, _HOOK_ATTR, inner.register_forward_pre_hook(_take_cached_features, with_kwargs=True))


def use_vision_cache(params: Params, model, collator, splits: Mapping[str, Sequence[Mapping]], device, recipe):
    """The collator a training stage uses: ``collator`` itself, or — when ``vision_cache.enabled`` and the images of
    ``splits`` (name → text-encoded records) fit — a copy fed from the filled cache, with ``model`` accepting it.
    The cache is filled on ``device`` (the training's: ``model`` is moved there unless it was dispatched, as a 4-bit
    base is), in batches of the recipe's ``eval_batch`` prepared by its ``dataloader_workers``."""
    store = open_store(params, model, collator.processor)
    if store is None:
        return collator
    if getattr(unwrap(model), "hf_device_map", None) is None:
        model.to(device)
    images = [text["image"] for texts in splits.values() for text in texts]
    what = " + ".join(splits)
    if not fill(store, model, collator.processor, images, what, recipe.eval_batch, recipe.dataloader_workers):
        return collator
    accept_cached_features(model)
    return collator.with_features(store)


__all__ = ["BATCH_KEYS", "accept_cached_features", "connector_inputs", "encode_images", "fill", "open_store",
           "pad_features", "use_vision_cache"]  # fmt: skip
