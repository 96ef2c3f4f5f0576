"""Load the resolved base (``model.base_dir``, written by ``med-idefics base``): processor and model, optionally 4-bit.

``base_dir`` holds either a full ``save_pretrained`` model + processor (the tiny base) or a pointer file
``base.json`` naming where the weights live: ``{"source": "hub", "id", "revision"}`` for a hub model (not copied: the
8B checkpoint is 16 GB) or ``{"source": "local", "path", "given", "sha256"}`` for a local folder (also not copied, for
the same reason). Both also record ``do_image_splitting`` from params. Where a pointed-to base is found on this
machine — the HF cache offline, a moved clone, ``$MED_IDEFICS_BASE`` — is :mod:`med_idefics.modeling.offline`'s.
A hub token is read from ``$HF_TOKEN`` only and never logged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoProcessor,
    BitsAndBytesConfig,
    Idefics2ForConditionalGeneration,
    ProcessorMixin,
    TrainingArguments,
)
from transformers.training_args import ParallelMode

from med_idefics.config import ConfigError, QuantizationConfig

logger = logging.getLogger(__name__)
POINTER_FILE = "base.json"
#: Kept out of 4-bit quantization: the SigLIP vision encoder (the paper's QLoRA quantized only the language side)
#: and the output head. Module paths of transformers' ``Idefics2ForConditionalGeneration``.
VISION_MODULE = "model.vision_model"
QUANTIZATION_SKIP_MODULES = (VISION_MODULE, "lm_head")


def write_pointer(base_dir: str | Path, pointer: dict[str, Any]) -> Path:
    path = Path(base_dir) / POINTER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pointer, indent=2) + "\n")
    return path


def read_pointer(base_dir: str | Path) -> dict[str, Any] | None:
    """The pointer in ``base_dir``, or None when ``base_dir`` holds the model itself."""
    path = Path(base_dir) / POINTER_FILE
    if not path.is_file():
        return None
    pointer = json.loads(path.read_text())
    if pointer.get("source") not in ("hub", "local"):
        raise ConfigError(
            f"{path}: source must be hub or local, got {pointer.get('source')!r}; rerun `med-idefics base`"
        )
    return pointer


def base_source(base_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """(name or path for ``from_pretrained``, extra ``from_pretrained`` kwargs) for the base in ``base_dir``."""
    base_dir = Path(base_dir)
    pointer = read_pointer(base_dir)
    if pointer is None:
        if not (base_dir / "config.json").is_file():
            raise ConfigError(
                f"no base model in {base_dir} (model.base_dir): run `med-idefics base` (or `dvc repro base`) first"
            )
        return str(base_dir), {}
    from med_idefics.modeling.offline import locate

    return locate(pointer, base_dir)


def base_digest(base_dir: str | Path) -> str:
    """What identifies the base for resuming: the digest of ``base_dir`` (the tiny base's weights, or a pointer with
    its hub id and revision); for a pointer to a local folder also that folder's file names, sizes and times (its
    weights are too large to hash at every start)."""
    digest = _folder_digest(Path(base_dir).resolve(), _listing(base_dir))
    pointer = read_pointer(base_dir)
    if pointer is not None and pointer["source"] == "local":
        digest += "+" + hashlib.blake2b(repr(_listing(pointer["path"])).encode(), digest_size=16).hexdigest()
    return digest


def _listing(folder: str | Path) -> tuple:
    folder = Path(folder)
    files = folder.rglob("*")
    return tuple(sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=8)
def _folder_digest(folder: Path, listing: tuple) -> str:
    """The files' sha256, once per process while names, sizes and times stay the same: a saved 8B base is 16.8 GB
    (~11 s to hash), and the vision cache asks for it on every store it opens."""
    from med_idefics.files import folder_sha256

    return folder_sha256(folder)


def hub_token() -> str | bool:
    """``$HF_TOKEN``, or False: never a token cached on disk by ``huggingface-cli login``."""
    return os.environ.get("HF_TOKEN") or False


def load_processor(base_dir: str | Path) -> ProcessorMixin:
    """The base's processor; for a pointer, with ``do_image_splitting`` as recorded from params."""
    source, kwargs = base_source(base_dir)
    processor = AutoProcessor.from_pretrained(source, **kwargs)
    pointer = read_pointer(base_dir)
    if pointer is not None and "do_image_splitting" in pointer:
        processor.image_processor.do_image_splitting = pointer["do_image_splitting"]
    return processor


def quantization_config(quantization: QuantizationConfig) -> BitsAndBytesConfig | None:
    """bitsandbytes 4-bit settings from params (None when ``load_in_4bit`` is false); the vision encoder and
    ``lm_head`` stay in full precision."""
    if not quantization.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quantization.compute_dtype, "quantization.compute_dtype"),
        llm_int8_skip_modules=list(QUANTIZATION_SKIP_MODULES),
    )


def base_dtype(quantization: QuantizationConfig) -> torch.dtype:
    """The precision rule, the same in training, evaluation and serving: every weight that is not 4-bit (all of
    them without QLoRA; the vision encoder, ``lm_head``, embeddings and norms with it) is held in
    ``quantization.compute_dtype``, the dtype the 4-bit layers compute in. (peft's k-bit preparation would upcast
    them to fp32 for training only, so a model would be trained at one precision and evaluated at another.)
    LoRA weights stay fp32 (peft's ``autocast_adapter_dtype``). Runs record the rule as
    :func:`~med_idefics.config.precision_label`."""
    return torch_dtype(quantization.compute_dtype, "quantization.compute_dtype")


def local_device() -> int | str:
    """This process's device: the GPU of its rank (``LOCAL_RANK`` under torchrun/accelerate, else 0), or the CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    return int(os.environ.get("LOCAL_RANK", "0"))


def one_device_per_process(args: TrainingArguments) -> TrainingArguments:
    """A single process that sees several GPUs (`dvc repro`, `med-idefics train`) trains on the first one only.

    Left alone, the Trainer wraps the model in ``nn.DataParallel`` over every visible GPU: micro-batch x N samples
    per step (N times fewer steps: another recipe than on one GPU, and other results) while a 4-bit model, which is
    not split, holds every weight on cuda:0 (``load_base_model``). Data parallelism is torchrun's (one process per
    GPU). ``_n_gpu`` is what the Trainer reads for both the wrapping and the batch size; TrainingArguments has no
    public setter for it."""
    if args.parallel_mode == ParallelMode.NOT_DISTRIBUTED:
        logger.warning(
            "%d GPUs are visible to one process: training on cuda:0 only (for data parallelism over all of them "
            "start one process per GPU: torchrun --nproc_per_node %d -m med_idefics.cli train …)",
            args.n_gpu,
            args.n_gpu,
        )
        args._n_gpu = 1
    return args


#: Above this many parameters a base needs CUDA: on a CPU, torch trains and answers with an 8B model (bitsandbytes'
#: CPU backend for 4-bit) at a speed no run can wait for. The tiny bases (~10M) are made for the CPU.
CPU_PARAMETER_LIMIT = 1_000_000_000


def require_cuda_for_a_large_base(base_dir: str | Path) -> None:
    """Refuse, before anything is read or loaded, a base of more than :data:`CPU_PARAMETER_LIMIT` parameters when
    torch sees no CUDA device, saying what is missing. Counted from the base's config alone (a model built on the
    meta device: no weight is read); a base saved in ``base_dir`` (the tiny builds) is never refused."""
    if torch.cuda.is_available() or read_pointer(base_dir) is None:
        return
    from transformers import AutoConfig

    source, kwargs = base_source(base_dir)
    with torch.device("meta"):
        model = Idefics2ForConditionalGeneration(AutoConfig.from_pretrained(source, **kwargs))
    count = sum(p.numel() for p in model.parameters())
    if count <= CPU_PARAMETER_LIMIT:
        return
    torch_build = (
        f"torch {torch.__version__} is a CPU-only build of torch"
        if torch.version.cuda is None
        else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}; check the driver: nvidia-smi)"
    )
    raise ConfigError(
        f"model.base {source} has {count / 1e9:.1f}B parameters and needs a CUDA GPU: {torch_build}. On a CPU it "
        "would train and answer in days, not hours. Run it on a machine with an NVIDIA GPU and a CUDA build of torch, "
        "or use model.base=tiny (the offline demo) or tiny-real-processor on a CPU"
    )


def load_base_model(
    base_dir: str | Path,
    quantization: QuantizationConfig,
    attn_implementation: str | None = None,
    device_map: str | dict | None = None,
) -> Idefics2ForConditionalGeneration:
    """The base model from ``base_dir`` (or what its pointer names) at the precision of :func:`base_dtype`; 4-bit nf4
    when ``quantization.load_in_4bit`` (weights then land on this rank's GPU if there is one, else the CPU, unless
    ``device_map`` says otherwise). ``attn_implementation`` is params ``model.attn_implementation`` (None:
    transformers chooses). An 8B base without CUDA is refused (:func:`require_cuda_for_a_large_base`)."""
    require_cuda_for_a_large_base(base_dir)
    source, kwargs = base_source(base_dir)
    bnb = quantization_config(quantization)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        kwargs["device_map"] = device_map or {"": local_device()}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return Idefics2ForConditionalGeneration.from_pretrained(source, dtype=base_dtype(quantization), **kwargs)


def torch_dtype(name: str, key: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"{key}: {name!r} is not a torch dtype; use float32, bfloat16 or float16")
    return dtype
