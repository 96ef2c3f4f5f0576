"""LoRA (and QLoRA) adapters on the base, from params ``lora``: on the text model, the modality projection and the
perceiver resampler — never on the vision encoder, which stays frozen as in the paper."""

from __future__ import annotations

import re

from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

from med_idefics.config import ConfigError, LoraConfig
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


def add_lora(
    model: nn.Module, lora_cfg: LoraConfig, quantized: bool, gradient_checkpointing: bool = False
) -> PeftModel:
    """Freeze the base and wrap it with fresh LoRA adapters; for a 4-bit base (QLoRA) prepare it for k-bit
    training first (norms in fp32, input gradients enabled)."""
    lora_targets(model, lora_cfg)  # fail early, with the params key, on a pattern that is empty or touches vision
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
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
