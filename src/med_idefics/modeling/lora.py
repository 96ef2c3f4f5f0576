"""LoRA (and QLoRA) adapters on the base, from params ``lora``: on the text model, the modality projection and the
perceiver resampler — never on the vision encoder, which stays frozen as in the paper.

Every training stage goes through :func:`add_lora` — a fresh adapter (stage 1, single-stage) or a saved one made
trainable (stage 2) — so all three prepare the base the same way, 4-bit or not."""

from __future__ import annotations

import re
from pathlib import Path

from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

from med_idefics.config import ConfigError, LoraConfig
from med_idefics.modeling.adapters import check_adapter_fits
from med_idefics.modeling.loading import VISION_MODULE


def lora_targets(model: nn.Module, lora_cfg: LoraConfig) -> dict[str, nn.Linear]:
    """The linear layers ``lora.target_modules`` selects: peft's rule for a string, a full match of the module name.

    Raises ConfigError when nothing matches or when a vision-encoder layer would be adapted."""
    pattern = re.compile(lora_cfg.target_modules)
    targets = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and pattern.fullmatch(name)
    }
    if not targets:
        raise ConfigError(f"lora.target_modules {lora_cfg.target_modules!r} matches no linear layer of the base")
    vision = sorted(name for name in targets if name.startswith(VISION_MODULE + "."))
    if vision:
        raise ConfigError(f"lora.target_modules must not match the vision encoder, but matches {vision[0]} (and more)")
    return targets


def expected_trainable_parameters(model: nn.Module, lora_cfg: LoraConfig) -> int:
    """What the adapters should add, from the layer shapes alone: r x (in + out) per adapted linear layer."""
    return sum(lora_cfg.r * (m.in_features + m.out_features) for m in lora_targets(model, lora_cfg).values())


#: Passed to ``torch.utils.checkpoint``: the non-reentrant variant recomputes correctly when only adapter weights
#: need gradients (the reentrant one needs the inputs to require grad, and warns or drops gradients otherwise).
CHECKPOINTING_KWARGS = {"use_reentrant": False}


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """Freeze the base, turn the KV cache off (training never reuses it; with checkpointing it would be recomputed),
    and turn activation checkpointing on when asked — the k-bit preparation of peft without its fp32 upcast (see
    :func:`~med_idefics.modeling.loading.base_dtype`), applied alike to a 4-bit and a full-precision base."""
    for param in model.parameters():
        param.requires_grad_(False)
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config.use_cache = False
    if gradient_checkpointing and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINTING_KWARGS)
    elif gradient_checkpointing:  # transformers 5.17, the lent GPU machine's
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS)
    return model


def add_lora(
    model: nn.Module, lora_cfg: LoraConfig, gradient_checkpointing: bool = False, init_adapter: Path | None = None
) -> PeftModel:
    """The base (4-bit or not) prepared for training and wrapped with trainable LoRA adapters: fresh ones from
    ``lora_cfg``, or the adapter saved in ``init_adapter`` (stage 2 continues stage 1's weights — the same adapter
    made trainable, not a second one on top; its own config then decides r, alpha and targets)."""
    if init_adapter is not None:
        check_adapter_fits(init_adapter, model)  # fail before training on an adapter made for another base
        model = prepare_for_training(model, gradient_checkpointing)
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    lora_targets(model, lora_cfg)  # fail early, with the params key, on a pattern that is empty or touches vision
    model = prepare_for_training(model, gradient_checkpointing)
    init = {"true": True, "false": False}.get(lora_cfg.init.lower(), lora_cfg.init)
    peft_config = PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        init_lora_weights=init,
        target_modules=lora_cfg.target_modules,
        task_type=None,
    )
    return get_peft_model(model, peft_config)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
