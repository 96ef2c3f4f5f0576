"""A tiny Idefics2 built offline: a word-level tokenizer trained on the demo corpus, an ``Idefics2Processor`` around it
and an ``Idefics2ForConditionalGeneration`` with the layer sizes of params ``model.tiny``.

Every piece is the real transformers class, so everything downstream (collator, LoRA, QLoRA, Trainer, generation) runs
the same code path as with ``HuggingFaceM4/idefics2-8b``; only the sizes and the tokenizer differ. The model returned
here is randomly initialised: :mod:`med_idefics.modeling.bases` pretrains it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor, PreTrainedTokenizerFast
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

from med_idefics.config import TinyModelConfig
from med_idefics.prompts import END_OF_UTTERANCE

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
FAKE_IMAGE, IMAGE = "<fake_token_around_image>", "<image>"
#: Fixed ids 0..6, in this order, in every tiny tokenizer.
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, FAKE_IMAGE, IMAGE, END_OF_UTTERANCE)

#: The structure of the official idefics2-8b chat template: ``User:<image>question<end_of_utterance>\nAssistant: …``.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
#: The words the chat template itself writes; always in the vocabulary.
TEMPLATE_TEXT = "User: Assistant:"

VOCAB_MULTIPLE = 64  # embedding rows padded to a multiple of 64 (matmul-friendly, bitsandbytes-friendly)


def build_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a lowercase word-level tokenizer on ``texts`` with at most ``vocab_size`` entries, special tokens included.

    Words are split at whitespace and punctuation (``x-ray`` → ``▁x``, ``-``, ``ray``); as in sentencepiece, a word
    that follows a space carries a ``▁`` mark, so decoding restores the text exactly (up to case and runs of
    whitespace) — generated answers compare cleanly with the references. Unknown words become ``<unk>``.
    Deterministic for the same texts."""
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"model.tiny.vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}"
        )
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="always"), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="always")
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tokenizer.train_from_iterator([TEMPLATE_TEXT, *texts], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        add_bos_token=True,
        extra_special_tokens=[FAKE_IMAGE, IMAGE, END_OF_UTTERANCE],
        padding_side="right",
    )


def build_processor(
    tokenizer: PreTrainedTokenizerFast, cfg: TinyModelConfig, do_image_splitting: bool = False
) -> Idefics2Processor:
    """An ``Idefics2Processor``: images resized to at most ``cfg.image_size`` on the longest edge, one image →
    ``cfg.perceiver_latents`` ``<image>`` tokens. The PIL image processor is used directly (no torchvision here)."""
    image_processor = Idefics2ImageProcessorPil(
        do_image_splitting=do_image_splitting,
        size={"longest_edge": cfg.image_size, "shortest_edge": max(cfg.patch_size, cfg.image_size // 2)},
    )
    return Idefics2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=cfg.perceiver_latents,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> Idefics2Config:
    """Idefics2 config from params ``model.tiny``; token ids from ``tokenizer``.

    Weights start at std 1/sqrt(width) (a default linear layer's scale), not transformers' 0.02, which is tuned for
    4096-wide layers: at width 64 it starts every attention uniform and shrinks each layer's signal about 6x, and the
    tiny base stayed blind to everything but colour (a linear probe on its connector output read the dot count at
    chance after 1,500 pretraining steps, though the vision encoder's features gave it perfectly).

    Sizes not in params: vision MLP 2 x hidden (SigLIP has ~3.7x; the vision tower runs on every patch of every
    image, so its MLP is the cheapest place to save a few percent of each pretraining step), perceiver without
    grouped key/values (kv heads = heads, so its matrix dims stay multiples of 64)."""
    vocab = math.ceil(len(tokenizer) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (("pad", PAD), ("bos", BOS), ("eos", EOS))}
    text = {
        "model_type": "mistral",
        "vocab_size": vocab,
        "hidden_size": cfg.text_hidden,
        "intermediate_size": cfg.text_intermediate,
        "num_hidden_layers": cfg.text_layers,
        "num_attention_heads": cfg.text_heads,
        "num_key_value_heads": cfg.text_kv_heads,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "initializer_range": cfg.text_hidden**-0.5,
        "tie_word_embeddings": False,
        "pad_token_id": ids["pad"],
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
    }
    vision = {
        "hidden_size": cfg.vision_hidden,
        "intermediate_size": 2 * cfg.vision_hidden,
        "num_hidden_layers": cfg.vision_layers,
        "num_attention_heads": cfg.vision_heads,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "initializer_range": cfg.vision_hidden**-0.5,
    }
    perceiver = {
        "hidden_size": cfg.text_hidden,
        "rms_norm_eps": 1e-5,
        "resampler_n_latents": cfg.perceiver_latents,
        "resampler_depth": cfg.perceiver_depth,
        "resampler_n_heads": cfg.perceiver_heads,
        "resampler_head_dim": cfg.perceiver_head_dim,
        "num_key_value_heads": cfg.perceiver_heads,
        "initializer_range": cfg.text_hidden**-0.5,
    }
    return Idefics2Config(
        text_config=text,
        vision_config=vision,
        perceiver_config=perceiver,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        tie_word_embeddings=False,
    )


def build_model(processor: Idefics2Processor, cfg: TinyModelConfig, seed: int) -> Idefics2ForConditionalGeneration:
    """A randomly initialised tiny Idefics2 matching ``processor`` (same ``<image>`` id and image_seq_len), seeded:
    the same seed gives the same weights. Generation stops at ``<end_of_utterance>``."""
    tokenizer = processor.tokenizer
    if processor.image_seq_len != cfg.perceiver_latents:
        raise ValueError(
            f"processor image_seq_len {processor.image_seq_len} != model.tiny.perceiver_latents {cfg.perceiver_latents}"
        )
    config = tiny_config(cfg, tokenizer)
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config)
    init_resampler(model)
    generation = model.generation_config
    generation.eos_token_id = tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    return model


def init_resampler(model: Idefics2ForConditionalGeneration) -> None:
    """Draw the perceiver resampler's latent queries from N(0, 1), as Flamingo's resampler does.

    transformers initialises every latent to ones (right for loading Idefics2-8b's trained latents, wrong for training
    from scratch): identical queries get identical outputs and gradients, so they never diverge and the resampler
    passes one pooled vector, ``perceiver_latents`` times over."""
    with torch.no_grad():
        model.model.connector.perceiver_resampler.latents.normal_(0.0, 1.0)


def build_tiny(
    texts: Iterable[str], cfg: TinyModelConfig, seed: int, do_image_splitting: bool = False
) -> tuple[Idefics2ForConditionalGeneration, Idefics2Processor]:
    """Tokenizer trained on ``texts`` → processor → randomly initialised model (not pretrained)."""
    processor = build_processor(build_tokenizer(texts, cfg.vocab_size), cfg, do_image_splitting)
    return build_model(processor, cfg, seed), processor


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
