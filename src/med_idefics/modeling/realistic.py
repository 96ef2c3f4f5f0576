"""``model.base: tiny-real-processor``: a tiny, randomly initialised Idefics2 behind the *real* Idefics2-8b processor.

Everything a prompt meets before the model is Idefics2-8b's own: the Mistral-7B v0.1 sentencepiece vocabulary (32,000
pieces, read from the copy that ships inside the ``mistral-common`` wheel, so no network is needed), Idefics2's three
added tokens at their published ids, ``<unk>`` as the pad token, the official chat template, and the image processing
(longest edge 980, shortest 378, SigLIP mean/std 0.5, bilinear resampling, 64 ``<image>`` tokens per image). Only the
layers are tiny and untrained. That makes it the offline stand-in for checks that depend on sentencepiece and on the
real image geometry (prompt masking, left-padded batched generation, QLoRA on CPU), which the word-level tokenizer of
the ``tiny`` base cannot show.

The ids and settings were checked against HuggingFaceM4/idefics2-8b's ``tokenizer_config.json``,
``processor_config.json`` and ``preprocessor_config.json``; ``tests/test_realistic_base.py`` asserts them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor, LlamaTokenizer
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

from med_idefics.config import ConfigError
from med_idefics.prompts import END_OF_UTTERANCE

NAME = "tiny-real-processor"
FAKE_IMAGE, IMAGE = "<fake_token_around_image>", "<image>"
#: Idefics2-8b's tokenizer_config.json: the three tokens added after Mistral's 32,000 pieces, and the pad token.
ADDED_TOKENS = {FAKE_IMAGE: 32000, IMAGE: 32001, END_OF_UTTERANCE: 32002}
PAD_TOKEN = "<unk>"  # id 0: Idefics2-8b pads with <unk>
MISTRAL_VOCAB_SIZE = 32_000
SPM_FILE = "data/tokenizer.model.v1"  # inside the mistral_common package: Mistral-7B v0.1's sentencepiece model
MISTRAL_COMMON_DIR, MISTRAL_COMMON_VERSION = "mistral-common", "1.13.1"  # = the Makefile's install

#: Idefics2-8b's processor_config.json (chat template, 64 visual tokens) and preprocessor_config.json (geometry).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IMAGE_SEQ_LEN = 64
LONGEST_EDGE, SHORTEST_EDGE = 980, 378
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)

#: The random layers: as small as 4-bit quantization on CPU allows (matrix dims multiples of 64). The vision patch is
#: 70 px instead of SigLIP's 14 so that a 980 px image is 14x14 = 196 patches, not 4,900: the processor's geometry
#: is untouched, only the (untrained) encoder sees it coarsely.
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}  # fmt: skip
VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
          "patch_size": 70}  # fmt: skip
PERCEIVER = {"resampler_depth": 1, "resampler_n_heads": 2, "resampler_head_dim": 32, "num_key_value_heads": 2}


def mistral_sentencepiece_file() -> Path:
    """Mistral-7B v0.1's sentencepiece model, from the ``mistral-common`` wheel: installed beside the venv's packages
    (``<venv>/mistral-common``, where ``make venv`` puts it), or importable. Beside, not importable, is the default
    because an importable mistral-common without its dependencies breaks every transformers processor, and its
    dependencies pin numpy below the project's pin; only this data file is read."""
    spec = importlib.util.find_spec("mistral_common")
    roots = [Path(sys.prefix) / MISTRAL_COMMON_DIR / "mistral_common"]
    roots += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    for root in roots:
        if (root / SPM_FILE).is_file():
            return root / SPM_FILE
    raise ConfigError(
        f"model.base={NAME!r} needs Mistral's tokenizer from the mistral-common wheel; install it with "
        f"`{sys.executable} -m pip install --no-deps --target {Path(sys.prefix) / MISTRAL_COMMON_DIR} "
        f"mistral-common=={MISTRAL_COMMON_VERSION}` (make venv does)"
    )


def build_tokenizer(sentencepiece_file: str | Path | None = None) -> LlamaTokenizer:
    """Mistral-7B v0.1's tokenizer as transformers builds Idefics2-8b's (byte-fallback BPE, ``legacy=False``: no
    dummy prefix after a special token), with Idefics2's added tokens and pad token. ``sentencepiece_file``: a copy
    of :func:`mistral_sentencepiece_file` (on a machine without the mistral-common wheel)."""
    from transformers.convert_slow_tokenizer import import_protobuf
    from transformers.tokenization_utils_base import generate_merges

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(sentencepiece_file or mistral_sentencepiece_file()).read_bytes())
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    if len(vocab) != MISTRAL_VOCAB_SIZE:
        raise ConfigError(f"{SPM_FILE} has {len(vocab)} pieces, expected Mistral v0.1's {MISTRAL_VOCAB_SIZE}")
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab),
        legacy=False,
        add_bos_token=True,
        add_eos_token=False,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(ADDED_TOKENS),
    )
    actual = {token: tokenizer.convert_tokens_to_ids(token) for token in ADDED_TOKENS}
    if actual != ADDED_TOKENS:  # guards the order above: the ids are the published ones or nothing works
        raise ConfigError(f"added token ids {actual} differ from Idefics2-8b's {ADDED_TOKENS}")
    return tokenizer


def build_processor(do_image_splitting: bool = False, tokenizer: LlamaTokenizer | None = None) -> Idefics2Processor:
    """Idefics2-8b's processor; ``tokenizer``: a saved copy of :func:`build_tokenizer`'s (on a machine without the
    mistral-common wheel)."""
    image_processor = Idefics2ImageProcessorPil(
        do_image_splitting=do_image_splitting,
        size={"longest_edge": LONGEST_EDGE, "shortest_edge": SHORTEST_EDGE},
        image_mean=list(SIGLIP_MEAN),
        image_std=list(SIGLIP_STD),
    )
    return Idefics2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer or build_tokenizer(),
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )


def model_config(tokenizer: LlamaTokenizer) -> Idefics2Config:
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
    text = {
        "model_type": "mistral",
        "vocab_size": len(tokenizer),  # 32,003 as in Idefics2-8b
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "eos_token_id": tokenizer.eos_token_id,
        **ids,
        **TEXT,
    }
    vision = {"image_size": LONGEST_EDGE, **VISION}
    perceiver = {"hidden_size": TEXT["hidden_size"], "rms_norm_eps": 1e-5, "resampler_n_latents": IMAGE_SEQ_LEN}
    return Idefics2Config(
        text_config=text,
        vision_config=vision,
        perceiver_config={**perceiver, **PERCEIVER},
        image_token_id=ADDED_TOKENS[IMAGE],
        tie_word_embeddings=False,
    )


def idefics2_8b_config(tokenizer):
    """The Idefics2-8B dimensions (HuggingFaceM4/idefics2-8b config.json), token ids from ``tokenizer``: the real
    shape with random weights, for the GPU benchmarks (nothing downloaded)."""
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
    return Idefics2Config(
        vision_config={"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                       "num_attention_heads": 16, "image_size": LONGEST_EDGE, "patch_size": 14},
        perceiver_config={"hidden_size": 4096, "resampler_n_latents": 64, "resampler_depth": 3,
                          "resampler_n_heads": 16, "resampler_head_dim": 96, "num_key_value_heads": 4},
        text_config={"model_type": "mistral", "vocab_size": 32003, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "sliding_window": 4096, **ids},
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        tie_word_embeddings=False,
    )  # fmt: skip


def build_realistic(seed: int, do_image_splitting: bool = False) -> tuple[Idefics2ForConditionalGeneration, Any]:
    """(random model, real processor); the same seed gives the same weights. Generation stops at
    ``<end_of_utterance>`` (or ``</s>``)."""
    processor = build_processor(do_image_splitting)
    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(model_config(tokenizer))
    generation = model.generation_config
    generation.eos_token_id = [ADDED_TOKENS[END_OF_UTTERANCE], tokenizer.eos_token_id]
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    return model.eval(), processor


def save_realistic_base(out_dir: Path, seed: int, do_image_splitting: bool) -> dict[str, Any]:
    """Build and ``save_pretrained`` model and processor into ``out_dir``; returns what was built."""
    model, processor = build_realistic(seed, do_image_splitting)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {
        "source": NAME,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(processor.tokenizer),
        "do_image_splitting": do_image_splitting,
    }
